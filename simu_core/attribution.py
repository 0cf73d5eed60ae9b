"""Critical-neuron attribution, SIMU step 1 (``simu-method.md``).

Neuron k of layer l is the k-th INPUT coordinate of that layer's MLP down projection; its
activation beta is the value entering the down projection, captured (and scaled) with a forward
pre-hook, so every architecture of :class:`~simu_core.models.adapter.ArchitectureAdapter` works the
same way (GPT-2's ``Conv1D`` included: its input is ``[..., d_ff]`` like a Linear's; OPT's
``fc2`` input, flattened to ``[batch * seq, d_ff]``, is viewed back as ``[batch, seq, d_ff]``).

For a next-token sample i (a prompt plus answer prefix, predicting one answer token) and layer l,
the activation is scaled along a_j = (j/m) * beta, j = 1..m, and

    Att(l, k) = sum_i  beta_{l,i,k} * (1/m) * sum_j  dF_i(a_j) / da_{l,k}

with F_i the log-probability of the target token (= minus the loss; the method page's sign
decision: a positive score means "this neuron helps produce the data").

Two modes:

``reference``
    The paper, literally: one sample per answer token (the prompt + answer prefix, cut right
    after the predicting position), the activation of ONE layer scaled at the predicting position
    only (every other position and layer keeps its original activation), the m scaled copies
    batched together (several samples per batch), a loop over layers. About
    L x m forward+backward passes per answer token.

``fast``
    Teacher forcing with per-position isolation, and the same numbers as the reference (to float
    rounding). One pass per (batch of items, layer) over whole sequences, the m scaled copies
    batched; layer l's activation is scaled at every answer-predicting position at once, F is the
    summed log-probability of all answer tokens, and the score adds beta * mean_j dF/da over the
    answer-predicting positions. Scaling all positions together would let them interact through
    attention (a later token's log-probability would reach an earlier position's gradient, and
    each position would see scaled neighbours). To prevent this, attention runs "two-stream":
    a clean pass of the same items records every layer's keys and values, and in the scaled
    copies each query attends to the CLEAN keys/values of the other positions and to its own
    (scaled-stream) key/value, which is what the reference's prefix sample computes. The
    function is registered in Hugging Face's attention interface, which every supported
    architecture dispatches through (a model that bypasses it gets the plain joint path, and the
    result's metadata says ``isolation: "none"``). The same clean pass caches each decoder layer's
    output, and the layers below l are replaced by stubs returning it (the copies are identical
    there), so the m copies only run layers l..L-1. Cost: about m x (one forward+backward) per
    item and layer on the upper layers only, against m x L per answer TOKEN for the reference;
    ``benchmarks/attribution.py`` measures both and their agreement.

Both modes: deterministic (fixed order, no sampling), parameters' ``requires_grad`` is switched off
during attribution (only the path from the scaled activation is differentiated, and no parameter
gradient is ever accumulated), memory is bounded by one batch: the m copies of one layer's pass,
plus (fast mode) that batch's clean keys/values and layer outputs; scores are accumulated per layer
in float64 as batches go, never as per-sample gradients. Attribution temporarily changes the model
(parameter flags, eval mode, attention implementation, layer stubs) and restores it, so one model
object must not be attributed by two threads at once.

Scores are written as Parquet with their metadata (mode, m, number of items and samples, model
and data identity) stored as JSON in the Parquet schema metadata under the key
``simu.attribution`` (see :func:`write_scores` / :func:`read_scores`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from simu_core.models.adapter import ArchitectureAdapter
from simu_core.prompting import IGNORE_INDEX, EncodedExample, collate
from simu_core.scoring import token_logprobs

MODES = ("fast", "reference")
METADATA_KEY = b"simu.attribution"
SCORE_COLUMNS = ("layer", "neuron", "forget_score", "retain_score")


@dataclass
class AttributionResult:
    """Attribution scores of one item set: one float64 vector ``[num_neurons]`` per layer."""

    scores: list[np.ndarray]
    mode: str
    steps: int
    num_examples: int
    num_samples: int  # next-token samples = answer tokens attributed
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (mode, m, counts, wall time, plus :attr:`metadata`)."""
        return {
            "mode": self.mode,
            "steps": self.steps,
            "num_examples": self.num_examples,
            "num_samples": self.num_samples,
            "seconds": self.seconds,
            "neurons_per_layer": [int(len(layer)) for layer in self.scores],
            **self.metadata,
        }


# ----------------------------------------------------------------------------------------------
# validation and small helpers


def _check_arguments(mode: str, steps: int, batch_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"attribution mode must be one of {list(MODES)}, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"attribution steps m must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"attribution batch_size must be an integer >= 1, got {batch_size!r}")


def _check_examples(examples: Sequence[EncodedExample]) -> None:
    if len(examples) == 0:
        raise ValueError("attribution needs at least one item; the item set is empty")
    for index, example in enumerate(examples):
        if len(example.input_ids) != len(example.labels):
            raise ValueError(
                f"item {index}: input_ids ({len(example.input_ids)}) and labels ({len(example.labels)}) differ in length"
            )
    if not any(_predicting_positions(example) for example in examples):
        raise ValueError(
            f"none of the {len(examples)} items has an answer token after the first position; nothing to attribute"
        )


def _predicting_positions(example: EncodedExample) -> list[int]:
    """Positions p whose output predicts an answer token (labels[p + 1] is labelled)."""
    return [t - 1 for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]


def _alphas(steps: int, rows_per_copy: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scale of every row of a copy-major batch: row j * B + b holds copy j (alpha = (j + 1) / m)."""
    alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return alphas.repeat_interleave(rows_per_copy).to(device=device, dtype=dtype)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _attribution_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled, parameters frozen (restored afterwards, even on error).

    Freezing the parameters means autograd records only the path from the scaled activation:
    nothing below the hooked layer is differentiated and no ``.grad`` is ever written.
    """
    was_training = model.training
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


def _batch_seq_view(base: torch.Tensor, batch: int) -> torch.Tensor:
    """The down-projection input as ``[batch, seq, d_ff]``.

    Most architectures pass ``[batch, seq, d_ff]``; OPT flattens its hidden states to
    ``[batch * seq, d_ff]`` before ``fc2``, so the hooks, which index ``[row, position]``, view it
    back (a view: the hook's output is reshaped to the input's own shape).
    """
    if base.dim() == 3:
        return base
    if base.dim() == 2 and base.shape[0] % batch == 0:
        return base.view(batch, base.shape[0] // batch, base.shape[1])
    raise RuntimeError(
        f"down-projection input of shape {tuple(base.shape)} is neither [batch, seq, d_ff] nor "
        f"[batch * seq, d_ff] for a batch of {batch}"
    )


@contextmanager
def _pre_hook(module: nn.Module, hook) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    # use_cache=False: no KV cache to build (and none that the layer stubs would leave stale).
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits


# ----------------------------------------------------------------------------------------------
# reference mode


def _attribute_reference(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    steps: int,
    batch_size: int,
    layers: Sequence[int],
    scores: list[torch.Tensor],
    bar: tqdm,
) -> None:
    device = next(model.parameters()).device
    # One sample per answer token: (item, predicting position). Sorting by prefix length keeps the
    # padding small; the sort is stable, so the order (and the float sums) are deterministic.
    samples = [(index, p) for index, example in enumerate(examples) for p in _predicting_positions(example)]
    samples.sort(key=lambda sample: sample[1])
    for layer in layers:
        module = adapter.layers[layer].down.module
        for chunk in _chunks(samples, batch_size):
            prefixes = [
                EncodedExample(examples[i].input_ids[: p + 1], [IGNORE_INDEX] * (p + 1)) for i, p in chunk
            ]
            batch = collate(prefixes, pad_token_id)
            rows_per_copy = len(chunk)
            positions = torch.tensor([p for _, p in chunk], device=device).repeat(steps)
            targets = torch.tensor([examples[i].labels[p + 1] for i, p in chunk], device=device).repeat(steps)
            rows = torch.arange(steps * rows_per_copy, device=device)
            state: dict[str, torch.Tensor] = {}

            def hook(mod, args, rows=rows, positions=positions, rows_per_copy=rows_per_copy, state=state):
                base = _batch_seq_view(args[0].detach(), len(rows))
                beta = base[rows, positions]  # [m * B, d_ff]; every copy has the same beta
                alpha = _alphas(steps, rows_per_copy, base.device, base.dtype)
                scaled = (beta * alpha[:, None]).requires_grad_(True)
                state["beta"], state["scaled"] = beta[:rows_per_copy], scaled
                # Only the predicting position of this one layer is replaced by the scaled value.
                return (base.index_put((rows, positions), scaled).view(args[0].shape),) + tuple(args[1:])

            input_ids = batch["input_ids"].to(device).repeat(steps, 1)
            attention_mask = batch["attention_mask"].to(device).repeat(steps, 1)
            with _pre_hook(module, hook):
                logits = _forward(model, input_ids, attention_mask)
            logprobs = torch.log_softmax(logits[rows, positions].float(), dim=-1)
            objective = logprobs.gather(-1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(objective, state["scaled"])
            mean_grad = grad.float().view(steps, rows_per_copy, -1).mean(0)
            scores[layer] += (state["beta"].float() * mean_grad).sum(0).double()
            bar.update(1)


# ----------------------------------------------------------------------------------------------
# fast mode


class _CachedLayer(nn.Module):
    """Stands in for a decoder layer below the attributed one: returns that layer's output as
    computed once on the clean batch (the scaled copies are identical to it there)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _map_batch(value: Any, batch: int, function) -> Any:
    """Apply ``function`` to every tensor of a (nested tuple/list) layer output whose dim 0 is the batch."""
    if torch.is_tensor(value):
        return function(value) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_map_batch(item, batch, function) for item in value)
    if isinstance(value, list):
        return [_map_batch(item, batch, function) for item in value]
    return value


def _cacheable(output: Any) -> bool:
    """Only plain tensors / tuples of tensors and None are replayed; anything else runs for real."""
    if output is None or torch.is_tensor(output):
        return True
    if isinstance(output, (tuple, list)):
        return all(_cacheable(item) for item in output)
    return False


@contextmanager
def _lower_layers_replaced(container: nn.ModuleList | None, layer: int, replayed: Any) -> Iterator[None]:
    """Replace decoder layers 0..layer-1 by stubs returning ``replayed`` (layer-1's clean output)."""
    if container is None or layer == 0:
        yield
        return
    originals = [container[i] for i in range(layer)]
    try:
        # Stubs below layer-1 return the same object: their output is ignored by the next stub.
        for i in range(layer):
            container[i] = _CachedLayer(replayed)
        yield
    finally:
        for i, original in enumerate(originals):
            container[i] = original


def _decoder_container(model: nn.Module, adapter: ArchitectureAdapter) -> nn.ModuleList | None:
    try:
        _, container = ArchitectureAdapter._find_layers(model)
    except ValueError:
        return None
    return container if len(container) == adapter.num_layers else None


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(item) for item in value)
    if isinstance(value, list):
        return [_detach(item) for item in value]
    return value


# Two-stream attention: per-position isolation for teacher forcing.
#
# In the reference, the sample for the answer token at t + 1 scales layer l's activation at
# position p = t only; every other position keeps its clean activation, so in the layers above l
# position p attends to the CLEAN keys/values of positions < p and to its own (scaled-stream)
# key/value. The attention function below computes exactly that for all answer-predicting
# positions of a sequence at once. A clean pass records, per attention module, the keys, values
# and mask of the whole sequence. The scaled copies then carry only the answer-predicting
# positions (as queries, with their true position ids): each attends to the recorded clean
# keys/values under the recorded mask row of its position, except that its own key/value (the
# diagonal) comes from the scaled stream. Position p's output then depends on the scaling at p
# and nowhere else, and one pass per layer gives the reference's per-token quantities and
# gradients. Prompt positions are not recomputed at all in the scaled copies. The function is
# registered in Hugging Face's attention interface, which every supported architecture
# dispatches through; a model that bypasses it gets the plain joint path (metadata
# ``isolation: "none"`` and a warning).

_ATTENTION_KEY = "simu_two_stream"


class _TwoStream:
    """State of the two-stream attention while one attribution runs (per thread: Prefect may run
    the forget and retain attributions in two threads of one process, each on its own model)."""

    _local = threading.local()

    @classmethod
    def current(cls) -> "_TwoStream | None":
        return getattr(cls._local, "state", None)

    @classmethod
    def set_current(cls, state: "_TwoStream | None") -> None:
        cls._local.state = state

    def __init__(self) -> None:
        self.recording = True
        self.copies = 1
        self.positions: torch.Tensor | None = None  # [B, Tq] query positions of the scaled copies
        self.clean: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def start_recording(self) -> None:
        self.recording, self.clean, self.positions = True, {}, None

    def replay(self, copies: int, positions: torch.Tensor) -> None:
        self.recording, self.copies, self.positions = False, copies, positions


def _expand_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)  # as HF's repeat_kv


def _additive_mask(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, dtype, device) -> torch.Tensor:
    """The attention mask as an additive float tensor [batch, 1, q_len, k_len]."""
    if mask is None:  # only when nothing needs masking but causality
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :k_len].to(dtype).expand(batch, 1, q_len, k_len)


def _two_stream_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _TwoStream.current()
    heads, q_len, dim = query.shape[1], query.shape[2], query.shape[3]
    scaling = dim**-0.5 if scaling is None else scaling
    key, value = _expand_heads(key, heads), _expand_heads(value, heads)
    if state is None or state.recording:  # plain (eager) attention; record the clean stream
        mask = _additive_mask(attention_mask, query.shape[0], q_len, key.shape[2], query.dtype, query.device)
        if state is not None:
            state.clean[id(module)] = (key.detach(), value.detach(), mask.detach())
        weights = torch.softmax((query @ key.transpose(-1, -2)) * scaling + mask, dim=-1, dtype=torch.float32)
        return (weights.to(query.dtype) @ value).transpose(1, 2).contiguous(), None
    if id(module) not in state.clean:
        raise RuntimeError("two-stream attention: no clean keys/values recorded for this attention module")
    clean_key, clean_value, clean_mask = state.clean[id(module)]  # [B, H, T, D] x 2, [B, 1, T, T]
    copies, positions = state.copies, state.positions  # positions: [B, Tq]
    rows, length = clean_key.shape[0], clean_key.shape[2]
    own = torch.nn.functional.one_hot(positions, length).bool()[None, :, None]  # [1, B, 1, Tq, T]
    q = query.view(copies, rows, heads, q_len, dim)
    scores = (q @ clean_key.transpose(-1, -2)[None]) * scaling  # [m, B, H, Tq, T]
    own_score = (q * key.view(copies, rows, heads, q_len, dim)).sum(-1, keepdim=True) * scaling
    scores = torch.where(own, own_score, scores)
    # Each query keeps the clean mask row of its own position (causal, padding, sliding window).
    mask = clean_mask.gather(2, positions[:, None, :, None].expand(rows, 1, q_len, length))[None]
    weights = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(query.dtype)
    clean_at_own = clean_value.gather(2, positions[:, None, :, None].expand(rows, heads, q_len, dim))
    own_weight = (weights * own).sum(-1, keepdim=True)
    output = weights @ clean_value[None] + own_weight * (value.view(copies, rows, heads, q_len, dim) - clean_at_own[None])
    return output.reshape(copies * rows, heads, q_len, dim).transpose(1, 2).contiguous(), None


def _register_two_stream() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:  # a transformers without the attention interface
        return False
    AttentionInterface.register(_ATTENTION_KEY, _two_stream_attention)
    AttentionMaskInterface.register(_ATTENTION_KEY, eager_mask)
    return True


@contextmanager
def _two_stream(model: nn.Module, enabled: bool = True) -> Iterator[_TwoStream | None]:
    """Route the model's attention through the two-stream function (None when impossible)."""
    config = getattr(model, "config", None)
    if not enabled or config is None or not hasattr(config, "_attn_implementation") or not _register_two_stream():
        yield None
        return
    previous = config._attn_implementation
    state = _TwoStream()
    _TwoStream.set_current(state)
    config._attn_implementation = _ATTENTION_KEY
    try:
        yield state
    finally:
        config._attn_implementation = previous
        _TwoStream.set_current(None)


def _scaling_hook(steps: int, rows_per_copy: int, index: tuple[torch.Tensor, torch.Tensor], count: int, state: dict):
    """Pre-hook: scale the down-projection input at ``index`` (copy-major) by (j + 1) / m."""

    def hook(module, args):
        base = _batch_seq_view(args[0].detach(), steps * rows_per_copy)
        alpha = _alphas(steps, rows_per_copy, base.device, base.dtype)
        beta = base[index]  # [m * count, d_ff]
        scaled = (beta * alpha[index[0]][:, None]).requires_grad_(True)
        state["beta"], state["scaled"] = beta[:count], scaled
        return (base.index_put(index, scaled).view(args[0].shape),) + tuple(args[1:])

    return hook


def _attribute_fast(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    steps: int,
    batch_size: int,
    layers: Sequence[int],
    scores: list[torch.Tensor],
    bar: tqdm,
    reuse_lower_layers: bool = True,
    isolate_positions: bool = True,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    container = _decoder_container(model, adapter) if reuse_lower_layers else None
    order = sorted(
        (index for index, example in enumerate(examples) if _predicting_positions(example)),
        key=lambda index: len(examples[index].input_ids),
    )
    isolated = True
    with _two_stream(model, enabled=isolate_positions) as attention:
        for chunk in _chunks(order, batch_size):
            batch = {key: value.to(device) for key, value in collate([examples[i] for i in chunk], pad_token_id).items()}
            rows = len(chunk)
            # The answer-predicting positions of every row (padded with position 0, marked invalid).
            wanted = [_predicting_positions(examples[i]) for i in chunk]
            width = max(len(positions) for positions in wanted)
            positions = torch.zeros(rows, width, dtype=torch.long, device=device)
            valid = torch.zeros(rows, width, dtype=torch.bool, device=device)
            for row, row_positions in enumerate(wanted):
                positions[row, : len(row_positions)] = torch.tensor(row_positions, device=device)
                valid[row, : len(row_positions)] = True
            count = int(valid.sum())

            # One clean pass: every decoder layer's output (for the layer stubs) and every
            # attention module's clean keys/values/mask (for the two-stream attention).
            outputs: list[Any] = []
            handles = [
                container[i].register_forward_hook(lambda mod, args, out: outputs.append(_detach(out)))
                for i in range(adapter.num_layers)
            ] if container is not None else []
            if attention is not None:
                attention.start_recording()
            try:
                with torch.no_grad():
                    _forward(model, batch["input_ids"], batch["attention_mask"])
            finally:
                for handle in handles:
                    handle.remove()
            if len(outputs) != adapter.num_layers or not all(_cacheable(out) for out in outputs):
                outputs = []  # layers not called once each, or odd outputs: run them for real
            if attention is not None and len(attention.clean) != adapter.num_layers:
                isolated = False  # the model does not dispatch attention through the interface

            if attention is not None and isolated:
                # Scaled copies hold only the answer-predicting positions, with their true
                # position ids; everything else comes from the clean pass.
                attention.replay(steps, positions)
                input_ids = batch["input_ids"].gather(1, positions).repeat(steps, 1)
                position_ids = positions.repeat(steps, 1)
                targets = batch["labels"].gather(1, (positions + 1).clamp(max=batch["labels"].shape[1] - 1))
                targets = targets.masked_fill(~valid, 0).repeat(steps, 1)
                selected = valid.repeat(steps, 1)
                attention_mask = None

                def gather(tensor: torch.Tensor) -> torch.Tensor:
                    index = positions.view(rows, width, *([1] * (tensor.dim() - 2)))
                    return tensor.gather(1, index.expand(rows, width, *tensor.shape[2:])).repeat(
                        steps, *([1] * (tensor.dim() - 1))
                    )
            else:
                if attention is not None:
                    attention.start_recording()  # plain attention from here on
                input_ids = batch["input_ids"].repeat(steps, 1)
                position_ids = None
                attention_mask = batch["attention_mask"].repeat(steps, 1)
                full = torch.zeros_like(batch["labels"], dtype=torch.bool)
                full[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
                selected = full.repeat(steps, 1)
                targets = None

                def gather(tensor: torch.Tensor) -> torch.Tensor:
                    return tensor.repeat(steps, *([1] * (tensor.dim() - 1)))

            index = selected.nonzero(as_tuple=True)  # copy-major, row-major order
            for layer in layers:
                state: dict[str, torch.Tensor] = {}
                hook = _scaling_hook(steps, rows, index, count, state)
                replayed = _map_batch(outputs[layer - 1], rows, gather) if outputs and layer > 0 else None
                with _lower_layers_replaced(container if replayed is not None else None, layer, replayed), \
                        _pre_hook(adapter.layers[layer].down.module, hook):
                    logits = _forward(model, input_ids, attention_mask, position_ids)
                if targets is not None:
                    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
                    objective = (logprobs * selected).sum()
                else:
                    objective = token_logprobs(logits, batch["labels"].repeat(steps, 1))[0].sum()
                (grad,) = torch.autograd.grad(objective, state["scaled"])
                mean_grad = grad.float().view(steps, count, -1).mean(0)
                scores[layer] += (state["beta"].float() * mean_grad).sum(0).double()
                bar.update(1)
    isolation = "two_stream" if attention is not None and isolated else "none"
    if isolate_positions and isolation == "none":
        warnings.warn(
            f"fast attribution could not isolate answer positions for {type(model).__name__} (its attention does "
            "not go through the Hugging Face attention interface): scores follow the joint path and only "
            "approximate the reference mode",
            RuntimeWarning,
            stacklevel=3,
        )
    return {"isolation": isolation}


# ----------------------------------------------------------------------------------------------
# public API


def attribute_neurons(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    mode: str = "fast",
    steps: int = 5,
    batch_size: int = 8,
    progress: bool = True,
    layers: Sequence[int] | None = None,
) -> AttributionResult:
    """Integrated-gradients attribution of every MLP neuron of every layer on ``examples``.

    ``mode`` is ``"reference"`` (the paper, literally) or ``"fast"`` (teacher forcing); ``steps``
    is m; ``batch_size`` counts next-token samples (reference) or items (fast) per pass, each
    expanded to m scaled copies. ``layers`` restricts the work to some layers (the others score
    zero). Raises ValueError on m < 1, an empty item set, items without answer tokens, or a model
    whose MLP the adapter does not know.
    """
    _check_arguments(mode, steps, batch_size)
    _check_examples(examples)
    adapter = ArchitectureAdapter(model)  # UnsupportedArchitectureError (a ValueError) when unknown
    if layers is None:
        layers = list(range(adapter.num_layers))
    layers = sorted(set(int(layer) for layer in layers))
    if not layers or layers[0] < 0 or layers[-1] >= adapter.num_layers:
        raise ValueError(f"layers must be a non-empty subset of 0..{adapter.num_layers - 1}, got {layers}")
    device = next(model.parameters()).device
    scores = [torch.zeros(size, dtype=torch.float64, device=device) for size in adapter.neurons_per_layer()]
    num_samples = sum(len(_predicting_positions(example)) for example in examples)
    if mode == "reference":
        passes = len(layers) * -(-num_samples // batch_size)
    else:
        usable = sum(1 for example in examples if _predicting_positions(example))
        passes = len(layers) * -(-usable // batch_size)
    started = time.perf_counter()
    bar = tqdm(total=passes, desc=f"attribution ({mode}, m={steps})", disable=not progress, leave=False)
    try:
        with _attribution_state(model):
            run = _attribute_reference if mode == "reference" else _attribute_fast
            details = run(model, adapter, examples, pad_token_id, steps, batch_size, layers, scores, bar) or {}
    finally:
        bar.close()
    return AttributionResult(
        scores=[layer_scores.cpu().numpy() for layer_scores in scores],
        mode=mode,
        steps=int(steps),
        num_examples=len(examples),
        num_samples=num_samples,
        seconds=time.perf_counter() - started,
        metadata=dict(details),
    )


def _as_layers(scores: AttributionResult | Sequence[np.ndarray] | None, name: str) -> list[np.ndarray] | None:
    if scores is None:
        return None
    if isinstance(scores, AttributionResult):
        scores = scores.scores
    return [np.asarray(layer, dtype=np.float64).reshape(-1) for layer in scores]


def attribution_table(
    forget_scores: AttributionResult | Sequence[np.ndarray] | None,
    retain_scores: AttributionResult | Sequence[np.ndarray] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The score table ``(layer, neuron, forget_score, retain_score)``, one row per neuron.

    A missing set's column is NaN. ``metadata`` is kept in ``table.attrs["attribution"]``, which
    :func:`write_scores` stores in the Parquet schema metadata.
    """
    forget = _as_layers(forget_scores, "forget")
    retain = _as_layers(retain_scores, "retain")
    if forget is None and retain is None:
        raise ValueError("attribution_table needs forget scores, retain scores or both")
    shape = [len(layer) for layer in (forget if forget is not None else retain)]
    if forget is not None and retain is not None and [len(layer) for layer in retain] != shape:
        raise ValueError(
            f"forget and retain scores have different shapes: {shape} vs {[len(layer) for layer in retain]} neurons per layer"
        )
    frames = []
    for layer, size in enumerate(shape):
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(size, layer, dtype=np.int32),
                    "neuron": np.arange(size, dtype=np.int32),
                    "forget_score": forget[layer] if forget is not None else np.full(size, np.nan),
                    "retain_score": retain[layer] if retain is not None else np.full(size, np.nan),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table.attrs["attribution"] = dict(metadata or {})
    return table


def scores_from_table(table: pd.DataFrame, column: str) -> list[np.ndarray]:
    """Per-layer score vectors of one column of a score table (rows ordered by neuron)."""
    for needed in ("layer", "neuron", column):
        if needed not in table.columns:
            raise ValueError(f"score table lacks column {needed!r}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("score table is empty")
    out = []
    for layer in range(int(table["layer"].max()) + 1):
        rows = table[table["layer"] == layer].sort_values("neuron")
        if not np.array_equal(rows["neuron"].to_numpy(), np.arange(len(rows))):
            raise ValueError(f"score table layer {layer}: neurons are not exactly 0..{len(rows) - 1}")
        out.append(rows[column].to_numpy(dtype=np.float64))
    return out


def write_scores(table: pd.DataFrame, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a score table as Parquet; ``metadata`` (default ``table.attrs["attribution"]``) goes,
    as JSON, into the schema metadata under ``simu.attribution``."""
    meta = dict(metadata if metadata is not None else table.attrs.get("attribution", {}))
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    schema_meta = dict(arrow.schema.metadata or {})
    schema_meta.pop(b"PANDAS_ATTRS", None)  # the JSON below is the one source of metadata
    schema_meta[METADATA_KEY] = json.dumps(meta, sort_keys=True, default=_json_default).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow.replace_schema_metadata(schema_meta), path)
    return path


def read_scores(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a score table written by :func:`write_scores` and its metadata."""
    arrow = pq.read_table(path)
    raw = (arrow.schema.metadata or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    table = arrow.replace_schema_metadata({k: v for k, v in (arrow.schema.metadata or {}).items() if k != METADATA_KEY})
    frame = table.to_pandas()
    frame.attrs["attribution"] = metadata
    return frame, metadata


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Model identity for score metadata: name, class, shape, and a sha256 over the down projections.

    The fingerprint covers exactly the weights whose neurons are scored (and the count of all
    parameters), so two checkpoints differing anywhere in an MLP output get different identities.
    """
    adapter = ArchitectureAdapter(model)
    digest = hashlib.sha256()
    for down in adapter.down_projections():
        tensor = down.weight.detach().to("cpu").contiguous()
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    config = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "architecture": type(model).__name__,
        "num_layers": adapter.num_layers,
        "neurons_per_layer": adapter.neurons_per_layer(),
        "num_parameters": int(sum(param.numel() for param in model.parameters())),
        "down_proj_sha256": digest.hexdigest(),
    }


def data_identity(examples: Sequence[EncodedExample], item_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Data identity for score metadata: counts and a sha256 over the exact token ids and labels."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([list(example.input_ids), list(example.labels)]).encode())
    identity: dict[str, Any] = {
        "num_items": len(examples),
        "num_answer_tokens": int(sum(len(_predicting_positions(example)) for example in examples)),
        "tokens_sha256": digest.hexdigest(),
    }
    if item_ids is not None:
        identity["item_ids_sha256"] = hashlib.sha256("\n".join(map(str, item_ids)).encode()).hexdigest()
    return identity
