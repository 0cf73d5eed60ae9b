"""The MUSE evaluation (VerbMem, KnowMem forget / retain, PrivLeak) with MUSE's generation settings.

Each constant below names the reference file it comes from (``swj0419/muse_bench``; see
:mod:`simu_core.metrics.muse` for the metric definitions and where its files were read). Raw text
throughout, no chat template, BOS added by the tokenizer as MUSE's ``tokenizer(prompt,
add_special_tokens=True)`` / ``tokenizer.encode(text)`` do.

Differences from the reference code, none of which changes a definition:

- Generation and scoring are batched (left-padded generation, right-padded scoring) where MUSE runs
  one item at a time: equal up to floating-point rounding.
- Decoded texts get transformers' ``clean_up_tokenization`` explicitly (MUSE decodes with
  ``clean_up_tokenization_spaces=True``; recent transformers ignore that flag for BPE tokenizers).
- MUSE never truncates (prompts, PrivLeak texts). ``max_length`` (default None: MUSE) caps prompts
  at their last ``max_length`` tokens and PrivLeak texts at their first ``max_length`` tokens
  (open-unlearning cuts PrivLeak texts at 2048 tokens after BOS).
- MUSE also scores ``privleak/retain`` for AUC keys it does not report; only forget and holdout,
  the ``forget_holdout_Min-40%`` key, are scored here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.data.muse import MuseBenchmark
from simu_core.evaluation.generation import generate_greedy
from simu_core.evaluation.results import HEADLINE_SPLIT, EvaluationResult, MetricTable
from simu_core.evaluation.scoring import score_examples
from simu_core.metrics import muse as muse_metrics
from simu_core.prompting import EncodedExample, pad_token_id

#: eval.py ``eval_model(verbmem_max_new_tokens=128)`` (also metrics/verbmem.py's default).
VERBMEM_MAX_NEW_TOKENS = 128
#: eval.py ``eval_model(knowmem_max_new_tokens=32)`` (also metrics/knowmem.py's default).
KNOWMEM_MAX_NEW_TOKENS = 32
#: metrics/knowmem.py: each in-context example, concatenated in file order.
KNOWMEM_EXAMPLE_TEMPLATE = "Question: {question}\nAnswer: {answer}\n\n"
#: metrics/knowmem.py: the question after the examples (ends in a space; the answer follows it).
KNOWMEM_QUESTION_TEMPLATE = "Question: {question}\nAnswer: "
#: metrics/knowmem.py ``get_prefix_before_words_occur(output, ["\n\n", "\nQuestion", "Question:"])``:
#: the generation is cut before the first of each, in this order.
KNOWMEM_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")
#: metrics/privleak.py ``compute_ppl``: ``tokenizer.encode(text)``, the whole text (no cap).
PRIVLEAK_MAX_LENGTH: int | None = None
#: MUSE generates one item at a time; open-unlearning's MUSE configs batch 8 (VerbMem, PrivLeak).
DEFAULT_BATCH_SIZE = 8

HEADLINE_METRICS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_auc", "privleak")
ITEM_COLUMNS = ("item_id", "split", "kind", "generation", "reference", "score", "nll")


@dataclass
class MuseEvaluation:
    """Per-item tables, the headline metrics and notes on what was not computed.

    ``verbmem``: item_id, prompt, gt, reference (gt cut as MUSE scores it), generation, rougeL_f1,
    rougeL_recall. ``knowmem``: item_id, split (forget / retain), question, answer, prompt,
    raw_generation, generation (cut at the stop strings), rougeL_f1, rougeL_recall. ``privleak``:
    item_id, split (forget / holdout), num_tokens (scored tokens), nll (mean), min_k.
    ``metrics``: the keys of :data:`HEADLINE_METRICS` (``privleak`` NaN without a reference AUC).
    """

    verbmem: pd.DataFrame
    knowmem: pd.DataFrame
    privleak: pd.DataFrame
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_result(self) -> EvaluationResult:
        """The same numbers as an :class:`EvaluationResult` (benchmark ``muse``; a NaN metric
        has no row and its ``*_computed`` flag is 0)."""
        parts = [
            pd.DataFrame({"item_id": self.verbmem["item_id"], "split": "forget", "kind": "verbmem",
                          "generation": self.verbmem["generation"], "reference": self.verbmem["reference"],
                          "score": self.verbmem["rougeL_f1"], "nll": np.nan}),
            pd.DataFrame({"item_id": self.knowmem["item_id"], "split": self.knowmem["split"], "kind": "knowmem",
                          "generation": self.knowmem["generation"], "reference": self.knowmem["answer"],
                          "score": self.knowmem["rougeL_f1"], "nll": np.nan}),
            pd.DataFrame({"item_id": self.privleak["item_id"], "split": self.privleak["split"], "kind": "privleak",
                          "generation": None, "reference": None, "score": self.privleak["min_k"],
                          "nll": self.privleak["nll"]}),
        ]
        items = pd.concat(parts, ignore_index=True)[list(ITEM_COLUMNS)]
        table = MetricTable("muse")
        for (kind, split), group in items.groupby(["kind", "split"], sort=False):
            table.add(f"{kind}_{split}", "num_items", len(group))
        for metric in HEADLINE_METRICS:
            value = self.metrics.get(metric, float("nan"))
            if np.isfinite(value):
                table.add(HEADLINE_SPLIT, metric, value)
        computed = np.isfinite(self.metrics.get("privleak", np.nan))
        table.add(HEADLINE_SPLIT, "privleak_computed", 1.0 if computed else 0.0)
        return EvaluationResult(items=items, metrics=table.frame(), notes=list(self.notes))


def knowmem_prompt(question: str, examples: pd.DataFrame | Sequence[tuple[str, str]]) -> str:
    """MUSE's KnowMem prompt: every in-context example, then the question (metrics/knowmem.py)."""
    pairs = zip(examples["question"], examples["answer"]) if isinstance(examples, pd.DataFrame) else examples
    prefix = "".join(KNOWMEM_EXAMPLE_TEMPLATE.format(question=q, answer=a) for q, a in pairs)
    return prefix + KNOWMEM_QUESTION_TEMPLATE.format(question=question)


def cut_knowmem_answer(text: str) -> str:
    """The generation before the first stop string, as metrics/knowmem.py cuts it (unstripped)."""
    for stop in KNOWMEM_STOP_STRINGS:
        text = text.split(stop)[0]
    return text


def verbmem_reference(tokenizer: PreTrainedTokenizerBase, gt: str, max_tokens: int = VERBMEM_MAX_NEW_TOKENS) -> str:
    """The true continuation as MUSE scores it (metrics/verbmem.py): its first ``max_tokens``
    tokens, BOS included when the tokenizer adds one, decoded without special tokens."""
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:max_tokens]
    return muse_metrics.clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True))


def _check_benchmark(benchmark: MuseBenchmark) -> None:
    for name, columns in (
        ("verbmem_forget", ("item_id", "prompt", "gt")),
        ("knowmem_forget", ("item_id", "question", "answer")),
        ("knowmem_retain", ("item_id", "question", "answer")),
        ("knowmem_forget_icl", ("question", "answer")),
        ("knowmem_retain_icl", ("question", "answer")),
    ):
        frame = getattr(benchmark, name)
        missing = [column for column in columns if column not in frame.columns]
        if missing:
            raise ValueError(f"MUSE {name} lacks column(s) {missing}; expected {list(columns)}")
        if frame.empty and not name.endswith("_icl"):
            raise ValueError(f"MUSE {name} is empty: nothing to evaluate")
    for name in ("privleak_forget", "privleak_holdout"):
        if not getattr(benchmark, name):
            raise ValueError(f"MUSE {name} is empty: PrivLeak needs forget and holdout texts")


def _generate(
    model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, max_length: int | None
) -> list[str]:
    # A capped prompt keeps its end (what the continuation follows) and leaves room for the
    # continuation within max_length positions (a small model has no positions past it).
    keep = None if max_length is None else max(1, max_length - max_new_tokens)
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        prompts.append(ids[-keep:] if keep else ids)
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [muse_metrics.clean_up_tokenization(text) for text in outputs]


def _privleak_scores(
    model, tokenizer, texts: list[str], split: str, batch_size: int, max_length: int | None
) -> pd.DataFrame:
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = ids[:max_length] if max_length else ids
        # Every token after the first is scored, as MUSE's ``input_ids[0][1:]``.
        examples.append(EncodedExample(input_ids=ids, labels=list(ids)))
    scored = score_examples(model, examples, pad_token_id(tokenizer), batch_size, token_stats=True)
    min_k = []
    for index, logprobs in enumerate(scored.token_logprobs):
        try:
            min_k.append(muse_metrics.min_k_statistic(logprobs, muse_metrics.PRIVLEAK_K))
        except ValueError as exc:
            raise ValueError(f"MUSE privleak {split} text {index}: {exc}") from None
    return pd.DataFrame({
        "item_id": [f"privleak_{split}-{index}" for index in range(len(texts))],
        "split": split,
        "num_tokens": scored.num_tokens,
        "nll": scored.nll,
        "min_k": min_k,
    })


def verbmem_table(model, tokenizer: PreTrainedTokenizerBase, rows: pd.DataFrame, batch_size: int = DEFAULT_BATCH_SIZE,
                  max_length: int | None = PRIVLEAK_MAX_LENGTH,
                  max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS) -> pd.DataFrame:
    """VerbMem per item (``item_id, prompt, gt, reference, generation, rougeL_f1, rougeL_recall``):
    the greedy continuation of each ``prompt`` against the true continuation cut as MUSE cuts it."""
    rows = rows.reset_index(drop=True)
    generations = _generate(model, tokenizer, list(rows["prompt"]), max_new_tokens, batch_size, max_length)
    references = [verbmem_reference(tokenizer, gt, max_new_tokens) for gt in rows["gt"]]
    scores = [muse_metrics.rouge_l(gen, ref) for gen, ref in zip(generations, references)]
    return rows[["item_id", "prompt", "gt"]].assign(
        reference=references, generation=generations,
        rougeL_f1=[s["rougeL_f1"] for s in scores], rougeL_recall=[s["rougeL_recall"] for s in scores],
    )


def knowmem_table(model, tokenizer: PreTrainedTokenizerBase, rows: pd.DataFrame, examples: pd.DataFrame, split: str,
                  batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = PRIVLEAK_MAX_LENGTH,
                  max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS) -> pd.DataFrame:
    """KnowMem per question of one split (``item_id, split, question, answer, prompt, raw_generation,
    generation, rougeL_f1, rougeL_recall``): MUSE's in-context prompt, the answer cut at its stop strings."""
    rows = rows.reset_index(drop=True)
    prompts = [knowmem_prompt(question, examples) for question in rows["question"]]
    raw = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length)
    answers = [cut_knowmem_answer(text) for text in raw]
    scores = [muse_metrics.rouge_l(gen, gold) for gen, gold in zip(answers, rows["answer"])]
    return rows[["item_id", "question", "answer"]].assign(
        split=split, prompt=prompts, raw_generation=raw, generation=answers,
        rougeL_f1=[s["rougeL_f1"] for s in scores], rougeL_recall=[s["rougeL_recall"] for s in scores],
    )[["item_id", "split", "question", "answer", "prompt", "raw_generation", "generation", "rougeL_f1", "rougeL_recall"]]


def evaluate_muse(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: MuseBenchmark,
    reference_privleak_auc: float | None = None,
    max_items: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = PRIVLEAK_MAX_LENGTH,
    *,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
) -> MuseEvaluation:
    """Run VerbMem, KnowMem (forget, retain) and PrivLeak on ``model``.

    ``reference_privleak_auc``: the retain (retrained) model's ``privleak_auc``; without it
    ``privleak`` is NaN. ``max_items`` keeps the first N items of every table and PrivLeak set
    (the in-context examples are always all used). ``max_length``: see the module docstring.
    The VerbMem gold text is cut at ``verbmem_max_new_tokens`` tokens, as MUSE cuts it.
    """
    _check_benchmark(benchmark)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
    head = (lambda rows: rows[:max_items]) if max_items else (lambda rows: rows)
    notes: list[str] = []

    verbmem = verbmem_table(model, tokenizer, head(benchmark.verbmem_forget), batch_size, max_length,
                            verbmem_max_new_tokens)
    knowmem = pd.concat([
        knowmem_table(model, tokenizer, head(benchmark.knowmem_forget), benchmark.knowmem_forget_icl, "forget",
                      batch_size, max_length, knowmem_max_new_tokens),
        knowmem_table(model, tokenizer, head(benchmark.knowmem_retain), benchmark.knowmem_retain_icl, "retain",
                      batch_size, max_length, knowmem_max_new_tokens),
    ], ignore_index=True)

    privleak = pd.concat([
        _privleak_scores(model, tokenizer, list(head(benchmark.privleak_forget)), "forget", batch_size, max_length),
        _privleak_scores(model, tokenizer, list(head(benchmark.privleak_holdout)), "holdout", batch_size, max_length),
    ], ignore_index=True)

    forget_stats = privleak.loc[privleak["split"] == "forget", "min_k"].to_numpy()
    holdout_stats = privleak.loc[privleak["split"] == "holdout", "min_k"].to_numpy()
    auc = muse_metrics.privleak_auc(forget_stats, holdout_stats)
    if reference_privleak_auc is None:
        leak = float("nan")
        notes.append(
            "privleak not computed: no reference_privleak_auc (the retain model's privleak_auc; "
            "MUSE's Llama-2-7B values are simu_core.metrics.muse.MUSE_RETRAIN_PRIVLEAK_AUC)"
        )
    else:
        leak = muse_metrics.privleak(auc, reference_privleak_auc)
    metrics = {
        "verbmem_forget": float(verbmem["rougeL_f1"].mean()),
        "knowmem_forget": float(knowmem.loc[knowmem["split"] == "forget", "rougeL_f1"].mean()),
        "knowmem_retain": float(knowmem.loc[knowmem["split"] == "retain", "rougeL_f1"].mean()),
        "privleak_auc": auc,
        "privleak": leak,
    }
    return MuseEvaluation(verbmem=verbmem, knowmem=knowmem, privleak=privleak, metrics=metrics, notes=notes)
