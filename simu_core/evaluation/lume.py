"""The LUME evaluation suite (SemEval-2025 Task 4, official scorer definitions).

Regurgitation (``completion`` rows) and knowledge (``qa`` rows) per task and split from greedy
256-token continuations of the raw ``input``; MIA (LOSS attack) on member / non-member documents;
MMLU accuracy from a local MMLU-format folder when one is given (see :mod:`.mmlu`). Without MMLU
data, ``mmlu`` and ``final_score`` have no rows and their ``*_computed`` flags are 0.

As in the official scorer: generations are scored as its CSV round trip reads them (a generation
exactly ``""``, ``N/A``, ``NA``, ``None``, ``null``, ``nan``, ... is scored as the text ``nan``;
:mod:`simu_core.metrics.lume`), and an MMLU accuracy below 0.371 raises a warning (a
``UserWarning`` and a note); the flag row ``mmlu_below_threshold`` (1.0 / 0.0, only when MMLU was
computed) records it in the metrics table.

``EvalConfig.max_items`` keeps the first N rows of each (split, task, kind) cell, so that all 12
cells of the task aggregate stay present on a subset, the first N documents of each MIA set and
the first N questions of each MMLU subject.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.config import EvalConfig
from simu_core.data.lume import LumeBenchmark
from simu_core.evaluation.generation import generate_greedy
from simu_core.evaluation.mmlu import evaluate_mmlu, load_mmlu
from simu_core.evaluation.results import HEADLINE_SPLIT, EvaluationResult, MetricTable
from simu_core.evaluation.scoring import score_examples
from simu_core.metrics import lume as lume_metrics
from simu_core.prompting import EncodedExample, pad_token_id

LUME_MAX_NEW_TOKENS = 256
ROW_FIELDS = ("id", "input", "output", "task", "kind", "split")
KIND_NAMES = {"completion": "regurgitation", "qa": "knowledge"}
ITEM_COLUMNS = ("item_id", "split", "task", "kind", "generation", "reference", "score", "nll")


def _check_frame(frame: pd.DataFrame, fields: tuple[str, ...], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"LUME {what} must be a DataFrame, got {type(frame).__name__}")
    missing = [name for name in fields if name not in frame.columns]
    if missing:
        raise ValueError(f"LUME {what} lack field(s) {missing}; expected {list(fields)}")
    if frame.empty:
        raise ValueError(f"LUME {what} are empty: nothing to evaluate")


def validate_lume(benchmark: LumeBenchmark) -> None:
    """Clear errors for LUME rows or MIA documents without the expected fields or values."""
    rows = benchmark.rows
    _check_frame(rows, ROW_FIELDS, "rows")
    for name, allowed in (("kind", KIND_NAMES), ("split", lume_metrics.SPLITS), ("task", lume_metrics.TASKS)):
        bad = sorted(set(rows[name]) - set(allowed))
        if bad:
            raise ValueError(f"LUME rows: unknown {name} value(s) {bad}; expected {list(allowed)}")
    for name in ("input", "output"):
        for number, (row_id, value) in enumerate(zip(rows["id"], rows[name])):
            if not isinstance(value, str) or (name == "input" and not value):
                raise ValueError(f"LUME row {number} (id {row_id!r}): {name} must be a non-empty string, got {value!r}")
            if name == "output" and not value.strip():
                raise ValueError(f"LUME row {number} (id {row_id!r}): output is empty")
    for what, frame in (("mia_member documents", benchmark.mia_member), ("mia_nonmember documents", benchmark.mia_nonmember)):
        _check_frame(frame, ("document",), what)
        for number, value in enumerate(frame["document"]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"LUME {what}: row {number} document must be a non-empty string, got {value!r}")


def _document_nlls(model, tokenizer, documents: list[str], batch_size: int, max_length: int) -> np.ndarray:
    examples = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=True)["input_ids"][:max_length]
        # Every token is a label (the first is never predicted): the whole-document LOSS attack.
        examples.append(EncodedExample(input_ids=ids, labels=list(ids)))
    return np.maximum(score_examples(model, examples, pad_token_id(tokenizer), batch_size).nll, 0.0)


def evaluate_lume(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: LumeBenchmark,
    config: EvalConfig,
    mmlu: str | Path | pd.DataFrame | None = None,
    *,
    max_length: int = 512,
) -> EvaluationResult:
    """Run the LUME suite; ``mmlu`` is a local MMLU folder (or a frame from :func:`load_mmlu`)."""
    validate_lume(benchmark)
    rows = benchmark.rows.reset_index(drop=True)
    if config.max_items:
        rows = rows.groupby(["split", "task", "kind"], sort=False).head(config.max_items).reset_index(drop=True)
    members = benchmark.mia_member.iloc[: config.max_items] if config.max_items else benchmark.mia_member
    nonmembers = benchmark.mia_nonmember.iloc[: config.max_items] if config.max_items else benchmark.mia_nonmember

    prompts = []
    for text in rows["input"]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        # Over-long prefixes keep their end: that is what the continuation follows.
        prompts.append(ids[-max_length:])
    max_new_tokens = config.max_new_tokens or LUME_MAX_NEW_TOKENS
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens, config.batch_size)
    scores = [
        lume_metrics.regurgitation_score(gen, gold) if kind == "completion" else lume_metrics.knowledge_score(gen, gold)
        for gen, gold, kind in zip(generations, rows["output"], rows["kind"])
    ]
    items = pd.DataFrame(
        {
            "item_id": rows["id"].astype(str),
            "split": rows["split"],
            "task": rows["task"],
            "kind": rows["kind"],
            "generation": generations,
            "reference": rows["output"],
            "score": scores,
            "nll": np.nan,
        }
    )

    member_nll = _document_nlls(model, tokenizer, list(members["document"]), config.batch_size, max_length)
    nonmember_nll = _document_nlls(model, tokenizer, list(nonmembers["document"]), config.batch_size, max_length)
    mia_frames = [
        pd.DataFrame(
            {
                "item_id": (frame["id"] if "id" in frame else pd.Series(range(len(frame)))).astype(str).to_numpy(),
                "split": name, "task": None, "kind": "document", "generation": None, "reference": None,
                "score": np.nan, "nll": nll,
            }
        )
        for name, frame, nll in (("mia_member", members, member_nll), ("mia_nonmember", nonmembers, nonmember_nll))
    ]

    table = MetricTable("lume")
    notes: list[str] = []
    cells: dict[tuple[str, str, str], float] = {}
    for split in lume_metrics.SPLITS:
        split_items = items[items["split"] == split]
        table.add(split, "num_items", len(split_items))
        for kind, kind_name in KIND_NAMES.items():
            kind_items = split_items[split_items["kind"] == kind]
            if not kind_items.empty:
                table.add(split, kind_name, kind_items["score"].mean())
            for task in lume_metrics.TASKS:
                cell = kind_items[kind_items["task"] == task]
                if not cell.empty:
                    cells[(split, task, kind_name)] = float(cell["score"].mean())
                    table.add(split, f"{kind_name}_{task}", cells[(split, task, kind_name)])

    headline: dict[str, float] = {}
    missing_cells = [cell for cell in lume_metrics.TASK_AGGREGATE_CELLS if cell not in cells]
    if missing_cells:
        notes.append(f"task_aggregate not computed: no rows for cell(s) {missing_cells}")
    else:
        headline["task_aggregate"] = lume_metrics.task_aggregate(cells)
    headline["mia_auc"] = lume_metrics.mia_auc(member_nll, nonmember_nll)
    headline["mia_score"] = lume_metrics.mia_score(member_nll, nonmember_nll)

    mmlu_items = None
    if mmlu is None:
        notes.append("mmlu and final_score not computed: no MMLU data given (eval.mmlu_source)")
    else:
        data = mmlu if isinstance(mmlu, pd.DataFrame) else load_mmlu(mmlu, config.max_items)
        predictions = evaluate_mmlu(model, tokenizer, data, config.batch_size, max_length)
        headline["mmlu"] = float(predictions["correct"].mean())
        headline["mmlu_below_threshold"] = 1.0 if lume_metrics.mmlu_below_threshold(headline["mmlu"]) else 0.0
        if headline["mmlu_below_threshold"]:
            message = (
                f"MMLU accuracy {headline['mmlu']:.4f} is below the task's threshold "
                f"{lume_metrics.MMLU_THRESHOLD} (75 % of the original model's): the official scorer warns that "
                "such a model may not be considered in the final ranking"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            notes.append(message)
        table.add("mmlu", "num_items", len(predictions))
        mmlu_items = pd.DataFrame(
            {
                "item_id": [f"{subject}-{number}" for number, subject in enumerate(predictions["subject"])],
                "split": "mmlu", "task": predictions["subject"], "kind": "mmlu",
                "generation": [chr(ord("A") + int(p)) for p in predictions["prediction"]],
                "reference": [chr(ord("A") + int(a)) for a in predictions["answer"]],
                "score": predictions["correct"], "nll": np.nan,
            }
        )
        if "task_aggregate" not in headline:
            notes.append("final_score not computed: the task aggregate is missing")
    if "mmlu" in headline and "task_aggregate" in headline:
        headline["final_score"] = lume_metrics.final_score(
            headline["task_aggregate"], headline["mia_score"], headline["mmlu"]
        )
    for metric, value in headline.items():
        table.add(HEADLINE_SPLIT, metric, value)
    for metric in ("task_aggregate", "mmlu", "final_score"):
        table.add(HEADLINE_SPLIT, f"{metric}_computed", 1.0 if metric in headline else 0.0)

    parts = [items, *mia_frames] + ([mmlu_items] if mmlu_items is not None else [])
    all_items = pd.concat(parts, ignore_index=True)[list(ITEM_COLUMNS)]
    return EvaluationResult(items=all_items, metrics=table.frame(), notes=notes)
