"""What every attack measures, computed by the evaluation suite's own scoring code.

An attack measures a set of forget items (and, where it can change utility, retain items) twice:
as the model is and as the attack leaves it (quantized weights, another prompt, relearned
weights, another layer). The measures are the benchmark's (its registry row's ``attack_measures``,
measured by :mod:`simu_core.benchmarks.attack_measures`): on TOFU and the built-in benchmark forget probability,
ROUGE-L recall of a greedy answer and the forget truth-ratio score
(:func:`simu_core.evaluation.qa.score_items`), retain probability and ROUGE; on MUSE VerbMem and
KnowMem; on WMDP accuracy (and MMLU). Which attack applies to which benchmark is the registry row's
``attacks`` (the paraphrase and in-context attacks are the TOFU-style benchmarks' only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.config import EvalConfig, SimuConfig
from simu_core.data.schema import QABenchmark
from simu_core.metrics import tofu

FORGET_MEASURES = ("forget_prob", "forget_rouge", "forget_truth_ratio")
RETAIN_MEASURES = ("retain_prob", "retain_rouge")
#: Measures that grow with what the model knows of the answers: the ones recovery and the
#: OpenUnlearning robustness formulas read (the truth-ratio score grows as the answer is forgotten).
KNOWLEDGE_MEASURES = ("forget_prob", "forget_rouge", "retain_prob", "retain_rouge", "verbmem_forget", "knowmem_forget",
                      "knowmem_retain", "wmdp_accuracy", "mmlu")
#: Columns of an attack's table (one model): one row per setting and measure.
TABLE_COLUMNS = ("attack", "setting", "measure", "before", "after")
#: Columns kept per item (both phases) in ``attack_items.parquet``.
ITEM_COLUMNS = ("item_id", "split", "question", "probability", "truth_ratio", "generation", "rouge")


@dataclass
class AttackOutcome:
    """One attack on one model: ``table`` (:data:`TABLE_COLUMNS`), per-item values of every phase
    (``items``: setting, phase 'before' | 'after' and :data:`ITEM_COLUMNS`), files of its own
    (name -> table) and a summary (counts, seconds)."""

    table: pd.DataFrame
    items: pd.DataFrame
    files: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, float | int | str] = field(default_factory=dict)


def measured_splits(benchmark: QABenchmark, config: SimuConfig, retain: bool) -> dict[str, pd.DataFrame]:
    """The items an attack measures: the forget items the evaluation reads (the first
    ``eval.max_items``) and, with ``retain``, the first ``attack.retain_items`` retain evaluation items
    (``None``: as many as the evaluation reads)."""
    from simu_core.evaluation.qa import evaluation_splits

    splits = evaluation_splits(benchmark, config.eval.max_items)
    chosen = {"forget": splits["forget"]}
    if retain:
        count = config.attack.retain_items
        chosen["retain_eval"] = splits["retain_eval"].iloc[:count].reset_index(drop=True) if count else splits["retain_eval"]
    return chosen


def score(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame],
          eval_config: EvalConfig, max_length: int) -> pd.DataFrame:
    """Per-item values of ``model`` on ``splits`` ('forget' and/or 'retain_eval'), with generations."""
    from simu_core.evaluation.qa import score_items

    items = score_items(model, tokenizer, splits, eval_config, max_length=max_length)
    return items[list(ITEM_COLUMNS)]


def summarise(items: pd.DataFrame) -> dict[str, float]:
    """The measures of a per-item table: forget probability, ROUGE and truth-ratio score on its forget
    items, retain probability and ROUGE on its retain items (what is present)."""
    figures: dict[str, float] = {}
    forget = items[items["split"] == "forget"]
    retain = items[items["split"] == "retain_eval"]
    if len(forget):
        figures["forget_prob"] = float(forget["probability"].mean())
        figures["forget_rouge"] = float(forget["rouge"].mean())
        figures["forget_truth_ratio"] = tofu.truth_ratio_score_forget(forget["truth_ratio"].to_numpy())
    if len(retain):
        figures["retain_prob"] = float(retain["probability"].mean())
        figures["retain_rouge"] = float(retain["rouge"].mean())
    return figures


def table_rows(attack: str, setting: str, before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Rows of an attack's table for one setting: every measure present both before and after, the
    TOFU suite's in :data:`FORGET_MEASURES` then :data:`RETAIN_MEASURES` order, another suite's in
    ``before``'s order."""
    known = (*FORGET_MEASURES, *RETAIN_MEASURES)
    order = [name for name in known if name in before] + [name for name in before if name not in known]
    return [{"attack": attack, "setting": setting, "measure": name, "before": before[name], "after": after[name]}
            for name in order if name in after]


def phase_items(items: pd.DataFrame, setting: str, phase: str) -> pd.DataFrame:
    """``items`` tagged with its setting and phase (for ``attack_items.parquet``)."""
    return items.assign(setting=setting, phase=phase)[["setting", "phase", *items.columns]]


def outcome(attack: str, rows: list[dict], items: list[pd.DataFrame], **summary) -> AttackOutcome:
    """An :class:`AttackOutcome` from table rows and per-item frames."""
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    frame = pd.concat(items, ignore_index=True) if items else pd.DataFrame()
    return AttackOutcome(table=table, items=frame, summary={"attack": attack, **summary})
