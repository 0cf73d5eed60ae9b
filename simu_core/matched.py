"""Methods compared at matched forgetting, not at each method's best forget quality.

Over a learning-rate grid (the same for every method), each method traces a trade-off curve:
forgetting rises with the lr, utility falls. Comparing methods at their own "best" point compares
them at different levels of forgetting. Here each method (each curve: a setting of the sweep
minus the lr and the seed) is read where its forgetting *first reaches a level*, interpolated
between the two grid points around the crossing, seed by seed:

- ``forget_prob`` reaches the retain reference's forget probability (at or below it);
- ``forget_quality`` reaches a level (at or above it). The reference's own forget quality is 1
  by definition and no unlearned model reaches it, so the level is a KS p-value (0.05 by default:
  the test no longer tells the unlearned model's truth ratios from the reference's at 5 %).

Interpolation is linear in log10 of the forget measure (both span orders of magnitude) between
the last grid point before the crossing and the first one at or past it; the utility measures
(``model_utility``, ``retain_prob`` by default) and log10(lr) are interpolated with the same
weight. A curve that starts past the level (at its smallest lr) is read there and flagged
``at_smallest_lr``; a seed whose curve never reaches the level is counted, never imputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

LR_COLUMN = "config.unlearn.lr"
SEED_COLUMN = "config.run.seed"
UTILITY_METRICS = ("model_utility", "retain_prob")


@dataclass(frozen=True)
class Level:
    """A forgetting level: ``metric`` reaches ``value`` from above (``below=True``) or below."""

    metric: str
    value: float
    below: bool
    source: str  # how the value was obtained, for the report

    def reached(self, measured: float) -> bool:
        return measured <= self.value if self.below else measured >= self.value


class MatchedForgettingError(ValueError):
    """The runs cannot give a matched-forgetting comparison; the message says why."""


def curve_columns(runs: pd.DataFrame, setting_columns: Sequence[str]) -> list[str]:
    """The columns that name a curve: the sweep's setting columns minus the lr (and the seed)."""
    # The knockout check reads the target, never the unlearned model: its settings name no curve.
    columns = [column for column in setting_columns
               if column not in (LR_COLUMN, SEED_COLUMN) and not column.startswith("config.knockout.")]
    return columns or ["config.unlearn.method"]


MASKED_METHODS = ("simu", "simu_npo")
# Settings that only masked methods read: a baseline's curve is not named by them.
_MASK_ONLY = ("config.mask.", "config.attribution.", "config.knockout.", "config.unlearn.train_attention")


def curve_label(row: pd.Series, columns: Sequence[str]) -> str:
    """Readable curve name: the method, then the settings that distinguish it ("random neurons"
    for ``mask.rule=random``, "MLP only" for ``unlearn.train_attention=false``, others as
    key=value); a baseline is not named by mask settings it does not read."""
    method = str(row["config.unlearn.method"]) if "config.unlearn.method" in row.index else ""
    parts = [method] if method else []
    for column in columns:
        if column == "config.unlearn.method" or (method not in MASKED_METHODS and column.startswith(_MASK_ONLY)):
            continue
        if column == "config.mask.rule" and row[column] == "random":
            parts.append("(random neurons)")
            continue
        if column == "config.mask.rule":
            continue
        if column == "config.unlearn.train_attention":
            if not bool(row[column]):
                parts.append("(MLP only)")
            continue
        value = row[column]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{column.removeprefix('config.').split('.', 1)[-1]}={value}")
    return " ".join(parts)


def _log(value: float) -> float:
    # Forget probabilities reach 1e-17 and below; a floor keeps log10 finite for exact zeros.
    return math.log10(max(float(value), 1e-300))


def crossing(curve: pd.DataFrame, level: Level, utilities: Sequence[str]) -> dict[str, float | bool | None]:
    """Where one seed's curve (rows sorted by lr) first reaches the level: interpolated lr and
    utilities, or ``reached=False``."""
    measure = curve[level.metric].to_numpy(dtype=float)
    hits = [index for index, value in enumerate(measure) if np.isfinite(value) and level.reached(value)]
    if not hits:
        return {"reached": False, "at_smallest_lr": False, "lr": None, **{name: None for name in utilities}}
    first = hits[0]
    row = curve.iloc[first]
    if first == 0:
        return {"reached": True, "at_smallest_lr": True, "lr": float(row[LR_COLUMN]),
                **{name: float(row[name]) for name in utilities}}
    before = curve.iloc[first - 1]
    start, end, target = _log(before[level.metric]), _log(row[level.metric]), _log(level.value)
    weight = 1.0 if end == start else min(1.0, max(0.0, (target - start) / (end - start)))

    def between(a: float, b: float) -> float:
        return float(a + weight * (b - a))

    lr = 10 ** between(math.log10(float(before[LR_COLUMN])), math.log10(float(row[LR_COLUMN])))
    return {"reached": True, "at_smallest_lr": False, "lr": lr,
            **{name: between(float(before[name]), float(row[name])) for name in utilities}}


def matched_forgetting(
    runs: pd.DataFrame, setting_columns: Sequence[str], level: Level, utilities: Sequence[str] = UTILITY_METRICS,
    min_lrs: int = 2,
) -> pd.DataFrame:
    """One row per curve: seeds, seeds that reach the level, the interpolated lr and utilities
    (mean and std over the seeds that reach it) and a note. A curve with fewer than ``min_lrs``
    learning rates gets a row that says so; :class:`MatchedForgettingError` when every curve has
    too few, or the level's metric is missing."""
    if level.metric not in runs.columns or runs[level.metric].notna().sum() == 0:
        raise MatchedForgettingError(f"no run reports {level.metric}: nothing to match on")
    utilities = [name for name in utilities if name in runs.columns and runs[name].notna().any()]
    columns = curve_columns(runs, setting_columns)
    rows, too_few = [], []
    for _, curve_runs in runs.groupby(columns, sort=True, dropna=False):
        label = curve_label(curve_runs.iloc[0], columns)
        lrs = sorted(curve_runs[LR_COLUMN].unique())
        if len(lrs) < min_lrs:
            shown = ", ".join(f"{lr:g}" for lr in lrs)
            too_few.append(f"{label!r} has {len(lrs)} ({shown})")
            rows.append({"curve": label, "lrs": len(lrs), "seeds": int(curve_runs[SEED_COLUMN].nunique()),
                         "seeds_reached": 0,
                         **{f"{name}_{stat}": float("nan") for name in ("lr", *utilities) for stat in ("mean", "std")},
                         "note": f"not compared: {len(lrs)} learning rate ({shown}); needs at least {min_lrs}"})
            continue
        per_seed = [crossing(seed_runs.sort_values(LR_COLUMN), level, utilities)
                    for _, seed_runs in curve_runs.groupby(SEED_COLUMN)]
        reached = [item for item in per_seed if item["reached"]]
        row: dict[str, object] = {"curve": label, "lrs": len(lrs), "seeds": len(per_seed), "seeds_reached": len(reached)}
        for name in ("lr", *utilities):
            values = np.array([item[name] for item in reached], dtype=float)
            row[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        notes = []
        if not reached:
            notes.append(f"never reaches {level.metric} {'<=' if level.below else '>='} {level.value:.3g} "
                         f"(lr up to {max(lrs):g})")
        elif len(reached) < len(per_seed):
            notes.append(f"{len(per_seed) - len(reached)} of {len(per_seed)} seeds never reach the level")
        if any(item["at_smallest_lr"] for item in reached):
            notes.append("already past the level at the smallest lr (read there, not interpolated)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    if len(too_few) == len(rows):
        raise MatchedForgettingError(
            f"the matched-forgetting table needs at least {min_lrs} learning rates per method; "
            + "; ".join(too_few) + ": sweep unlearn.lr (e.g. --grid unlearn.lr=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2)"
        )
    return pd.DataFrame(rows)


def matched_markdown(table: pd.DataFrame, level: Level, utilities: Sequence[str] = UTILITY_METRICS) -> str:
    """The matched-forgetting table as Markdown (mean ± std over the seeds that reach the level)."""
    utilities = [name for name in utilities if f"{name}_mean" in table.columns]
    header = ["curve", "seeds reaching", "lr at level", *[f"{name} at level" for name in utilities], "note"]
    lines = [f"Level: {level.metric} {'<=' if level.below else '>='} {level.value:.4g} ({level.source}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        row = row._asdict()
        cells = [str(row["curve"]), f"{row['seeds_reached']}/{row['seeds']}"]
        for name in ("lr", *utilities):
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            if not np.isfinite(mean):
                cells.append("never reached")
            elif name == "lr":
                cells.append(f"{mean:.2e}" + (f" ± {std:.1e}" if np.isfinite(std) else ""))
            else:
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else ""))
        cells.append(str(row["note"]) or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
