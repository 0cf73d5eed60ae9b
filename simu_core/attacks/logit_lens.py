"""Logit lens attack: is the forgotten answer still readable from an intermediate layer?

Patil et al. (arXiv 2309.17410) and Łucki et al. (arXiv 2409.18025) show that an answer unlearning
has suppressed at the output can often still be decoded from the hidden states of earlier layers.
The lens reads every decoder layer's output hidden state ``h_l`` through the model's own final
normalisation and output embedding (``logits = unembed(norm(h_l))``) and scores the answer
teacher-forced, exactly as the evaluation scores the model's probability: exp(-mean NLL over the
answer tokens), prompts encoded by :func:`simu_core.prompting.encode_qa` with ``eval.template``.

The decoder layer's hook sees its raw output (Hugging Face's ``output_hidden_states`` has the final
norm already applied to its last entry), so the final norm is applied once at every layer and the
last layer's lens equals the model's own output probability. The attack's figure is the highest
per-layer mean probability (:func:`lens_summary`): well above the output's, the answer was hidden
rather than removed.

On WMDP the lens reads each option letter's log-likelihood after the harness's prompt
(:func:`simu_core.evaluation.wmdp.wmdp_examples`) from every layer, and the figure is the accuracy
of the letter it ranks first, per layer (:func:`layer_wmdp_accuracy`; the last layer's is the
model's own accuracy). Over many layers the best layer's accuracy is biased above chance even for a
model that knows nothing (a maximum of noisy accuracies): read it against the target's and per layer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from simu_core.config import EvalConfig
from simu_core.metrics import tofu
from simu_core.models.adapter import ArchitectureAdapter
from simu_core.prompting import IGNORE_INDEX, collate, encode_qa, pad_token_id

#: Where the final normalisation lives, by attribute path from the top-level model: Llama, Mistral,
#: Qwen2, OLMo (1, 2), Gemma, Phi-3 (``model.norm``); Phi (``model.final_layernorm``); GPT-2, GPT-J,
#: Falcon, Bloom (``transformer.ln_f``); GPT-NeoX. OPT (``model.decoder``) is handled apart.
_FINAL_NORMS = ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm")
#: Columns of :func:`layer_answer_probabilities`' table.
TABLE_COLUMNS = ("item_id", "layer", "probability", "nll")


def _module_at(model: nn.Module, dotted: str) -> nn.Module | None:
    module: nn.Module | None = model
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def final_norm_and_unembedding(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(norm, unembedding)``: the modules that turn the last decoder layer's output into logits.

    OPT's norm is its ``final_layer_norm`` followed by ``project_out`` when the model has one (it
    maps to the embedding width), and the identity for post-norm OPT (no final norm: its layer
    outputs are already normalised). Raises ValueError naming the model class when not found."""
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembedding is None:
        raise ValueError(f"logit lens: {type(model).__name__} has no output embedding (get_output_embeddings())")
    decoder = _module_at(model, "model.decoder")
    if decoder is not None and hasattr(decoder, "final_layer_norm"):
        # OPT: the final norm (None in post-norm OPT), then project_out where the model has one.
        parts = [part for part in (decoder.final_layer_norm, getattr(decoder, "project_out", None)) if part is not None]
        if not parts:
            return nn.Identity(), unembedding
        return (parts[0] if len(parts) == 1 else nn.Sequential(*parts)), unembedding
    for path in _FINAL_NORMS:
        norm = _module_at(model, path)
        if isinstance(norm, nn.Module):
            return norm, unembedding
    raise ValueError(
        f"logit lens: unsupported architecture {type(model).__name__}: no final normalisation at any of "
        f"{[*_FINAL_NORMS, 'model.decoder.final_layer_norm']}"
    )


def _float32(module: nn.Module) -> nn.Module:
    """``module`` itself when its parameters are float32, else a float32 copy (the lens reads in float32)."""
    if all(parameter.dtype == torch.float32 for parameter in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def layer_answer_probabilities(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    eval_config: EvalConfig,
    *,
    max_length: int,
) -> pd.DataFrame:
    """Per item of ``frame`` (item_id, question, answer) and per decoder layer l = 0..L-1, the answer
    probability exp(-mean answer-token NLL) read from layer l's output through the final norm and
    the output embedding; one forward pass per batch of ``eval_config.batch_size`` (right padded).

    Returns :data:`TABLE_COLUMNS`, L rows per item in ``frame``'s order, layers ascending."""
    missing = [column for column in ("item_id", "question", "answer") if column not in frame.columns]
    if missing:
        raise ValueError(f"logit lens: the items lack columns {missing}")
    if len(frame) == 0:
        raise ValueError("logit lens: no items to score")
    examples = [encode_qa(tokenizer, question, answer, max_length, template=eval_config.template)
                for question, answer in zip(frame["question"], frame["answer"])]
    for row, example in enumerate(examples):
        # Position 0 is never predicted, so a label there alone would score nothing.
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            raise ValueError(f"logit lens: item {row} has no answer token to score")
    sums, counts = layer_label_nll_sums(model, examples, pad_token_id(tokenizer), eval_config.batch_size)
    layers = sums.shape[1]
    nll = sums / counts[:, None]
    # A mean of -log_softmax is >= 0 mathematically; float rounding may leave -1e-8.
    nll = np.maximum(nll, 0.0)
    return pd.DataFrame({
        "item_id": np.repeat(frame["item_id"].astype(str).to_numpy(), layers),
        "layer": np.tile(np.arange(layers), len(examples)),
        "probability": tofu.probability_from_nll(nll.reshape(-1)),
        "nll": nll.reshape(-1),
    })


@torch.no_grad()
def layer_label_nll_sums(model: nn.Module, examples: list, pad_id: int, batch_size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)``: per example (an :class:`~simu_core.prompting.EncodedExample`) and decoder
    layer l, the sum over its labelled tokens of -log p(token) read from layer l's output through the
    final norm and the output embedding (float64, ``[examples, layers]``), and its labelled-token count.
    One forward pass per batch of ``batch_size`` (right padded, longest first)."""
    norm, unembedding = final_norm_and_unembedding(model)
    adapter = ArchitectureAdapter(model)
    norm, unembedding = _float32(norm), _float32(unembedding)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)  # Gemma 2/3's output cap
    layers = adapter.num_layers
    sums_out = np.empty((len(examples), layers), dtype=np.float64)
    counts_out = np.empty(len(examples), dtype=np.float64)
    device = next(model.parameters()).device
    # The lens recomputes the last layer's logits itself: the model's own need only one position.
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # Longest first: an out-of-memory error shows up on the first batch, not after minutes.
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index].input_ids))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {key: value.to(device) for key, value in collate([examples[i] for i in chunk], pad_id).items()}
            with contextlib.ExitStack() as stack:
                captured = [stack.enter_context(adapter.layer_output(layer)) for layer in range(layers)]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                      **keep_last)
            # Position t predicts label t+1; only the answer positions are read out (the norm acts
            # per position, so selecting them first changes nothing and saves the vocabulary matmul
            # over the prompt).
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            owner = mask.nonzero()[:, 0]
            targets = labels[mask]
            counts = mask.sum(-1).double()
            for layer, outputs in enumerate(captured):
                hidden = outputs[0][:, :-1][mask].float()
                # Autocast off: a caller's bfloat16 autocast would undo the float32 read-out.
                with torch.autocast(device_type=device.type, enabled=False):
                    logits = unembedding(norm(hidden)).float()
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, owner,
                                                                                               token_nll.double())
                sums_out[chunk, layer] = sums.cpu().numpy()
            counts_out[chunk] = counts.cpu().numpy()
    finally:
        model.train(was_training)
    return sums_out, counts_out


def layer_wmdp_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark, max_items: int | None,
                        batch_size: int, max_length: int) -> pd.DataFrame:
    """Per WMDP question and decoder layer: the option whose letter has the highest log-likelihood read
    from that layer (``item_id, layer, prediction, correct``); the last layer ranks as
    :func:`~simu_core.evaluation.wmdp.evaluate_wmdp` does (the same examples, teacher-forced)."""
    from simu_core.evaluation.wmdp import option_predictions, wmdp_examples

    questions, examples, num_choices = wmdp_examples(benchmark, tokenizer, max_items, max_length)
    sums, _ = layer_label_nll_sums(model, examples, pad_token_id(tokenizer), batch_size)
    frames = []
    for layer in range(sums.shape[1]):
        ranked = option_predictions(questions, -sums[:, layer].reshape(len(questions), num_choices))
        frames.append(ranked[["item_id", "prediction", "correct"]].assign(layer=layer))
    return pd.concat(frames, ignore_index=True)[["item_id", "layer", "prediction", "correct"]]


def lens_summary(table: pd.DataFrame) -> dict[str, float]:
    """From :func:`layer_answer_probabilities`' table: the mean probability over items of every
    layer (``lens_prob_layer_<l>``), the highest of them (``lens_prob_max``, the attack's figure)
    and the layer where it is reached (``lens_max_layer``, the first on a tie)."""
    if len(table) == 0:
        raise ValueError("logit lens: the table is empty")
    per_layer = table.groupby("layer")["probability"].mean().sort_index()
    figures = {f"lens_prob_layer_{int(layer)}": float(value) for layer, value in per_layer.items()}
    figures["lens_prob_max"] = float(per_layer.max())
    figures["lens_max_layer"] = float(per_layer.idxmax())
    return figures


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark, config) -> "AttackOutcome":
    """The lens on the measured forget items and the first ``attack.retain_items`` retain items: per
    layer (setting ``layer=<l>``) and at the best layer (setting ``max``), the mean lens probability
    (after) against the model's own output probability, the last layer's lens (before); the best
    layer itself as measure ``<split>_best_layer`` (before: the last layer). Writes the per-item,
    per-layer table as a file."""
    import time

    from simu_core.attacks.measures import measured_splits, outcome
    from simu_core.data.wmdp import WMDPBenchmark

    started = time.perf_counter()
    if isinstance(benchmark, WMDPBenchmark):  # multiple-choice questions: accuracy per layer
        return _run_wmdp(model, tokenizer, benchmark, config, started)
    splits = measured_splits(benchmark, config, retain=True)
    rows, frames = [], []
    for split, prefix in (("forget", "forget"), ("retain_eval", "retain")):
        table = layer_answer_probabilities(model, tokenizer, splits[split], config.eval,
                                           max_length=config.model.max_length)
        frames.append(table.assign(split=split))
        figures = lens_summary(table)
        layers = table["layer"].nunique()
        output = figures[f"lens_prob_layer_{layers - 1}"]  # the last layer's lens is the model's own output
        row = {"attack": "logit_lens", "measure": f"{prefix}_prob", "before": output}
        rows += [{**row, "setting": f"layer={layer}", "after": figures[f"lens_prob_layer_{layer}"]}
                 for layer in range(layers)]
        rows.append({**row, "setting": "max", "after": figures["lens_prob_max"]})
        rows.append({"attack": "logit_lens", "setting": "max", "measure": f"{prefix}_best_layer",
                     "before": float(layers - 1), "after": figures["lens_max_layer"]})
    result = outcome("logit_lens", rows, [], layers=int(frames[0]["layer"].nunique()),
                     measured_items=len(splits["forget"]), retain_items=len(splits["retain_eval"]),
                     seconds=time.perf_counter() - started)
    result.files["logit_lens_items.parquet"] = pd.concat(frames, ignore_index=True)
    return result


def _run_wmdp(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark, config, started: float):
    """The lens on WMDP's evaluation questions: accuracy per layer (setting ``layer=<l>``) and at the
    best layer (``max``) against the model's own (before: the last layer's), the best layer itself as
    ``wmdp_best_layer``; the per-question, per-layer table as a file."""
    import time

    from simu_core.attacks.measures import outcome

    table = layer_wmdp_accuracy(model, tokenizer, benchmark, config.eval.max_items, config.eval.batch_size,
                                config.model.max_length)
    per_layer = table.groupby("layer")["correct"].mean().sort_index()
    layers = len(per_layer)
    row = {"attack": "logit_lens", "measure": "wmdp_accuracy", "before": float(per_layer.iloc[-1])}
    rows = [{**row, "setting": f"layer={layer}", "after": float(value)} for layer, value in per_layer.items()]
    rows.append({**row, "setting": "max", "after": float(per_layer.max())})
    rows.append({"attack": "logit_lens", "setting": "max", "measure": "wmdp_best_layer", "before": float(layers - 1),
                 "after": float(per_layer.idxmax())})
    result = outcome("logit_lens", rows, [], layers=layers, measured_items=int(table["item_id"].nunique()),
                     seconds=time.perf_counter() - started)
    result.files["logit_lens_items.parquet"] = table.assign(split="wmdp")
    return result
