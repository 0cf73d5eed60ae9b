"""The outputs of an evaluation: a per-item table and a long-format aggregate table.

Aggregate table columns: ``benchmark, split, metric, value`` (one float per row). Headline metrics
sit in split ``"all"``; per-split means sit under the split's own name.

TOFU / built-in benchmark, split ``"all"``:
  ``forget_prob, forget_rouge, forget_truth_ratio`` (forget-set Probability, ROUGE-L recall and
  truth-ratio score mean min(R, 1/R)); ``extraction_strength, exact_memorization`` (forget set);
  the nine Model Utility components ``retain_prob, retain_rouge, retain_truth_ratio, ra_prob,
  ra_rouge, ra_truth_ratio, wf_prob, wf_rouge, wf_truth_ratio`` and ``model_utility``;
  ``mia_loss_auc, mia_zlib_auc, mia_min_k_auc, mia_min_k_plus_plus_auc`` (forget = members vs
  holdout); ``forget_quality`` and ``privleak`` (only with a retain reference's items);
  flags ``model_utility_computed``, ``forget_quality_computed`` and ``privleak_computed`` (1.0 /
  0.0). The light suite of a retain reference scores only forget and holdout, without
  generations: no ROUGE, no model utility or its components, no retain / ra / wf splits.
  Per split (forget, retain_eval, real_authors, world_facts, holdout): ``num_items``,
  ``probability``, ``rouge``, ``truth_ratio_score`` (where defined).

LUME, split ``"forget"`` / ``"retain"``: ``regurgitation_Task1`` .. ``knowledge_Task3`` (cell means),
``regurgitation``, ``knowledge`` (split means), ``num_items``. Split ``"all"``: ``task_aggregate``,
``mia_auc``, ``mia_score``, ``mmlu`` and ``final_score`` (only with MMLU data), flags
``task_aggregate_computed``, ``mmlu_computed`` and ``final_score_computed``; with MMLU data also
``mmlu_below_threshold`` (1.0 when MMLU < 0.371, the official scorer's warning threshold).

A metric that could not be computed has no row (never a made-up value) and its flag row is 0.0; the
``notes`` of :class:`EvaluationResult` say why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

METRIC_COLUMNS = ("benchmark", "split", "metric", "value")
HEADLINE_SPLIT = "all"
ITEMS_FILE = "items.parquet"
METRICS_FILE = "metrics.parquet"

#: Headline metric names of the TOFU-style suite (split "all"), in reporting order.
QA_HEADLINE_METRICS = (
    "forget_quality",
    "model_utility",
    "forget_prob",
    "forget_rouge",
    "forget_truth_ratio",
    "extraction_strength",
    "exact_memorization",
    "privleak",
    "mia_loss_auc",
    "mia_zlib_auc",
    "mia_min_k_auc",
    "mia_min_k_plus_plus_auc",
)

#: Headline metric names of the LUME suite (split "all").
LUME_HEADLINE_METRICS = ("final_score", "task_aggregate", "mia_score", "mia_auc", "mmlu")


@dataclass
class EvaluationResult:
    """Per-item results, the long-format aggregate table, and notes on what was not computed."""

    items: pd.DataFrame
    metrics: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def headline(self) -> dict[str, float]:
        """The split-"all" metrics as ``{metric: value}``."""
        rows = self.metrics[self.metrics["split"] == HEADLINE_SPLIT]
        return {str(metric): float(value) for metric, value in zip(rows["metric"], rows["value"])}

    def value(self, metric: str, split: str = HEADLINE_SPLIT) -> float:
        """One aggregate value; KeyError when it was not computed."""
        rows = self.metrics[(self.metrics["split"] == split) & (self.metrics["metric"] == metric)]
        if rows.empty:
            raise KeyError(f"metric {metric!r} (split {split!r}) was not computed; notes: {self.notes}")
        return float(rows["value"].iloc[0])

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``items.parquet`` and ``metrics.parquet`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        items_path, metrics_path = folder / ITEMS_FILE, folder / METRICS_FILE
        self.items.to_parquet(items_path, index=False)
        self.metrics.to_parquet(metrics_path, index=False)
        return items_path, metrics_path


class MetricTable:
    """Accumulates aggregate rows; refuses non-finite values so none is ever stored silently."""

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.rows: list[dict] = []

    def add(self, split: str, metric: str, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.benchmark} {split}/{metric}: non-finite value {value!r}")
        self.rows.append({"benchmark": self.benchmark, "split": split, "metric": metric, "value": value})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(METRIC_COLUMNS))
