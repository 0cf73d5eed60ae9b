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
``at_smallest_lr``; a seed whose curve never reaches the level is counted, never imputed. Each
reading keeps its bracket (the two grid lrs and the two measured forget values it sits between);
one whose two forget values differ by more than 2x is flagged ``wide_bracket``: the straight line
between them is a guess over that range.

A *reading* is one (target, seed): ``model.finetune.seed`` trains the target and its retain
reference, ``run.seed`` seeds unlearning. Spreads run over the readings, and the forget-probability
level is each reading's own (its target's retain reference, on its data).

Runs that stopped at the level themselves (``unlearn.stop_at``, :func:`stopped_readings`) need no
interpolation: each is read where it stopped, and shown with the forget value it reached.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd

from simu_core.benchmarks.info import BENCHMARK_INFO
from simu_core.method_names import is_masked

LR_COLUMN = "config.unlearn.lr"
SEED_COLUMN = "config.run.seed"
# Seeds the training of the target and of its retain reference: another value, another target.
TARGET_SEED_COLUMN = "config.model.finetune.seed"
UTILITY_METRICS = ("model_utility", "retain_prob")
#: Per stop measure, the other forget measure shown next to a matched reading (every benchmark's
#: registry row: forget quality at matched forget probability and back; MUSE's KnowMem at matched
#: VerbMem and back; WMDP: none).
OTHER_MEASURE = {measure: other for info in BENCHMARK_INFO.values() for measure, other in info.other_measure.items()}


def utility_metrics(runs: pd.DataFrame) -> tuple[str, ...]:
    """The utilities a matched comparison of ``runs`` reads: their benchmarks' (the registry's
    ``utility``), in order; the TOFU suite's when the runs name no benchmark."""
    column = "config.data.benchmark"
    names = sorted(set(runs[column].dropna())) if column in runs.columns else []
    found = [name for benchmark in names if benchmark in BENCHMARK_INFO for name in BENCHMARK_INFO[benchmark].utility]
    return tuple(dict.fromkeys(found)) or UTILITY_METRICS
STOP_MEASURES = ("forget_prob", "forget_quality")
# Settings that cannot change the unlearned model: they name no setting and no curve. (The
# attacks and the knockout check read a model, never change it; checkpointing and
# sharding give the same updates; the others only choose what is measured next to the run.)
NO_EFFECT_PREFIXES = ("config.relearn.", "config.knockout.", "config.attack.")
NO_EFFECT_COLUMNS = ("config.attacks", "config.unlearn.gradient_checkpointing", "config.model.finetune.gradient_checkpointing",
                     "config.unlearn.checkpoint_every", "config.run.devices", "config.eval.reference_full",
                     "config.unlearn.stop_tolerance", "config.unlearn.stop_retain_items")
# Where a run stops (stop_at, eval_every) is how a curve is read, not which curve it is.
STOP_COLUMNS = ("config.unlearn.stop_at", "config.unlearn.eval_every", "config.unlearn.stop_tolerance",
                "config.unlearn.stop_retain_items", "config.unlearn.stop_refine")


def has_no_effect(column: str) -> bool:
    """Whether a config column cannot change the unlearned model (see ``NO_EFFECT_*``)."""
    return column.startswith(NO_EFFECT_PREFIXES) or column in NO_EFFECT_COLUMNS


def target_seeds(runs: pd.DataFrame) -> pd.Series:
    """Each row's target seed; 0 where the column is missing (rows written before it existed)."""
    if TARGET_SEED_COLUMN not in runs.columns:
        return pd.Series(0, index=runs.index, name=TARGET_SEED_COLUMN)
    return runs[TARGET_SEED_COLUMN].fillna(0).astype(int)


def spread_text(targets: int, seeds: int, readings: int) -> str:
    """Over what a spread runs: "3 targets x 3 seeds = 9 readings" (or the counts when they are
    not a full grid)."""
    def plural(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    if targets * seeds == readings:
        return f"{plural(targets, 'target')} x {plural(seeds, 'seed')} = {plural(readings, 'reading')}"
    return f"{plural(readings, 'reading')} ({plural(targets, 'target')}, {plural(seeds, 'seed')})"


def reference_group_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that fix a retain reference and what it is measured on: the target's training
    (``model.*``, its seed included), the benchmark and split (``data.*``) and the evaluation
    (``eval.*``), minus settings that cannot change a model or a measure."""
    return [column for column in runs.columns
            if column.startswith(("config.model.", "config.data.", "config.eval.")) and not has_no_effect(column)]


def data_key(runs: pd.DataFrame) -> pd.Series:
    """Each row's data settings as one text (readings pair only on the same data)."""
    columns = sorted(column for column in runs.columns if column.startswith("config.data."))
    if not columns:
        return pd.Series("", index=runs.index)
    return runs[columns].map(str).agg(", ".join, axis=1)


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
    """The columns that name a curve: the sweep's setting columns minus the lr, the seeds (run
    and target: replicates), the stop settings and settings that cannot change the unlearned model."""
    columns = [column for column in setting_columns
               if column not in (LR_COLUMN, SEED_COLUMN, TARGET_SEED_COLUMN, *STOP_COLUMNS)
               and not has_no_effect(column)]
    return columns or ["config.unlearn.method"]


# Settings that only masked methods read: a baseline's curve is not named by them.
_MASK_ONLY = ("config.mask.", "config.attribution.", "config.knockout.", "config.unlearn.train_attention")


def curve_label(row: pd.Series, columns: Sequence[str]) -> str:
    """Readable curve name: the method, then the settings that distinguish it ("random neurons"
    for ``mask.rule=random``, "MLP only" for ``unlearn.train_attention=false``, others as
    key=value); a baseline is not named by mask settings it does not read."""
    method = str(row["config.unlearn.method"]) if "config.unlearn.method" in row.index else ""
    parts = [method] if method else []
    for column in columns:
        if column == "config.unlearn.method" or (not is_masked(method) and column.startswith(_MASK_ONLY)):
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
    """Where one reading's curve (rows sorted by lr) first reaches the level: interpolated lr and
    utilities, and the bracket: the grid lrs (``lr_low``, ``lr_high``) and measured forget values
    (``value_low``, ``value_high``) around the crossing, ``wide_bracket`` when those two values
    differ by more than 2x; or ``reached=False``."""
    measure = curve[level.metric].to_numpy(dtype=float)
    hits = [index for index, value in enumerate(measure) if np.isfinite(value) and level.reached(value)]
    nan = float("nan")
    bracket = {"lr_low": nan, "lr_high": nan, "value_low": nan, "value_high": nan, "wide_bracket": False}
    if not hits:
        return {"reached": False, "at_smallest_lr": False, "lr": None, **{name: None for name in utilities}, **bracket}
    first = hits[0]
    row = curve.iloc[first]
    if first == 0:
        return {"reached": True, "at_smallest_lr": True, "lr": float(row[LR_COLUMN]),
                **{name: float(row[name]) for name in utilities},
                **bracket, "lr_high": float(row[LR_COLUMN]), "value_high": float(row[level.metric])}
    before = curve.iloc[first - 1]
    start, end, target = _log(before[level.metric]), _log(row[level.metric]), _log(level.value)
    weight = 1.0 if end == start else min(1.0, max(0.0, (target - start) / (end - start)))

    def between(a: float, b: float) -> float:
        return float(a + weight * (b - a))

    low, high = float(before[level.metric]), float(row[level.metric])
    ratio = max(low, high) / min(low, high) if min(low, high) > 0 else math.inf
    lr = 10 ** between(math.log10(float(before[LR_COLUMN])), math.log10(float(row[LR_COLUMN])))
    return {"reached": True, "at_smallest_lr": False, "lr": lr,
            **{name: between(float(before[name]), float(row[name])) for name in utilities},
            "lr_low": float(before[LR_COLUMN]), "lr_high": float(row[LR_COLUMN]), "value_low": low, "value_high": high,
            "wide_bracket": bool(ratio > 2)}


def matched_readings(
    runs: pd.DataFrame, setting_columns: Sequence[str], level: Level, utilities: Sequence[str] = UTILITY_METRICS,
    level_values: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per reading (curve, target, seed) of a fixed-budget lr grid: where its curve first
    reaches the level (:func:`crossing`), at the reading's own level when ``level_values`` (one per
    run, aligned with ``runs``) is given, else at ``level.value``. Columns: curve, curve_order,
    lrs, target, seed, data, level, the crossing's."""
    utilities = [name for name in utilities if name in runs.columns and runs[name].notna().any()]
    columns = curve_columns(runs, setting_columns)
    frame = runs.assign(_target=target_seeds(runs), _data=data_key(runs),
                        _level=level.value if level_values is None else level_values.reindex(runs.index),
                        _seed=runs[SEED_COLUMN].fillna(0).astype(int) if SEED_COLUMN in runs.columns else 0)
    rows = []
    for order, (_, curve_runs) in enumerate(frame.groupby(columns, sort=True, dropna=False)):
        label = curve_label(curve_runs.iloc[0], columns)
        grid = sorted(curve_runs[LR_COLUMN].unique())
        for (target, seed), reading in curve_runs.groupby(["_target", "_seed"], sort=True):
            # One target, one retain reference: its runs share the level (mean guards float noise).
            value = float(reading["_level"].mean())
            if np.isfinite(value):
                point = crossing(reading.sort_values(LR_COLUMN), replace(level, value=value), utilities)
            else:
                point = {**crossing(reading.iloc[0:0], level, utilities), "no_level": True}
            rows.append({"curve": label, "curve_order": order, "lrs": len(grid),
                         "lr_grid": ", ".join(f"{lr:g}" for lr in grid), "target": int(target), "seed": int(seed),
                         "data": reading["_data"].iloc[0], "level": value, "no_level": False, **point})
    return pd.DataFrame(rows)


def matched_forgetting(
    runs: pd.DataFrame, setting_columns: Sequence[str], level: Level, utilities: Sequence[str] = UTILITY_METRICS,
    min_lrs: int = 2, level_values: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per curve: readings (``seeds``: targets x seeds), readings that reach the level
    (``seeds_reached``), the interpolated lr and utilities (mean and std over the readings that
    reach it), the levels, the brackets and a note. A curve with fewer than ``min_lrs`` learning
    rates gets a row that says so; :class:`MatchedForgettingError` when every curve has too few,
    or the level's metric is missing. ``level_values``: each run's own level (see
    :func:`matched_readings`)."""
    if level.metric not in runs.columns or runs[level.metric].notna().sum() == 0:
        raise MatchedForgettingError(f"no run reports {level.metric}: nothing to match on")
    utilities = [name for name in utilities if name in runs.columns and runs[name].notna().any()]
    readings = matched_readings(runs, setting_columns, level, utilities, level_values)
    return summarize_readings(readings, level, utilities, min_lrs)


def summarize_readings(readings: pd.DataFrame, level: Level, utilities: Sequence[str] = UTILITY_METRICS,
                       min_lrs: int = 2) -> pd.DataFrame:
    """The per-curve table of :func:`matched_forgetting` from :func:`matched_readings`' rows."""
    utilities = [name for name in utilities if name in readings.columns]
    rows, too_few = [], []
    for (_, label), curve in readings.groupby(["curve_order", "curve"], sort=True):
        lrs = int(curve["lrs"].iloc[0])
        counts = {"lrs": lrs, "targets": int(curve["target"].nunique()), "seeds": len(curve),
                  "spread": spread_text(curve["target"].nunique(), curve["seed"].nunique(), len(curve)),
                  "level_mean": float(curve["level"].mean()), "level_min": float(curve["level"].min()),
                  "level_max": float(curve["level"].max())}
        if lrs < min_lrs:
            shown = curve["lr_grid"].iloc[0]
            too_few.append(f"{label!r} has {lrs} ({shown})")
            rows.append({"curve": label, **counts, "seeds_reached": 0,
                         **{f"{name}_{stat}": float("nan") for name in ("lr", *utilities) for stat in ("mean", "std")},
                         "wide_brackets": 0, "bracket": "",
                         "note": f"not compared: {lrs} learning rate ({shown}); needs at least {min_lrs}"})
            continue
        reached = curve[curve["reached"].astype(bool)]
        row: dict[str, object] = {"curve": label, **counts, "seeds_reached": len(reached)}
        for name in ("lr", *utilities):
            values = reached[name].to_numpy(dtype=float)
            row[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        row["wide_brackets"] = int(reached["wide_bracket"].astype(bool).sum())
        row["bracket"] = _bracket_text(reached)
        notes = []
        without_level = int(curve["no_level"].astype(bool).sum())
        if without_level:
            notes.append(f"{without_level} of {len(curve)} readings have no reference level")
        if reached.empty:
            low, high = counts["level_min"], counts["level_max"]
            value = f"{low:.3g}" if np.isclose(low, high) else f"its level ({low:.3g}–{high:.3g})"
            top = curve["lr_grid"].iloc[0].rsplit(", ", 1)[-1]
            notes.append(f"never reaches {level.metric} {'<=' if level.below else '>='} {value} (lr up to {top})")
        elif len(reached) < len(curve):
            notes.append(f"{len(curve) - len(reached)} of {len(curve)} readings never reach the level")
        if row["wide_brackets"]:
            notes.append(f"wide bracket: {row['wide_brackets']} of {len(reached)} readings sit between two grid "
                         "points whose forget values differ by more than 2x (the interpolation is a guess there)")
        if reached["at_smallest_lr"].astype(bool).any():
            notes.append("already past the level at the smallest lr (read there, not interpolated)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    if len(too_few) == len(rows):
        raise MatchedForgettingError(
            f"the matched-forgetting table needs at least {min_lrs} learning rates per method; "
            + "; ".join(too_few) + ": sweep unlearn.lr (e.g. --grid unlearn.lr=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2)"
        )
    return pd.DataFrame(rows)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _span(values: pd.Series) -> str:
    low, high = float(values.min()), float(values.max())
    return _number(low) if low == high else f"{_number(low)}–{_number(high)}"


def _bracket_text(reached: pd.DataFrame) -> str:
    """The grid lrs each reading sits between, with the forget values measured there (ranges over
    the readings sharing a bracket)."""
    parts = []
    for (low, high), group in reached.groupby(["lr_low", "lr_high"], sort=True, dropna=False):
        count = f" ({len(group)} readings)" if len(group) > 1 and len(reached) > len(group) else ""
        if not np.isfinite(low):
            parts.append(f"at lr {_number(high)}: {_span(group['value_high'])}{count}")
        else:
            parts.append(f"lr {_number(low)}–{_number(high)}: {_span(group['value_low'])} → "
                         f"{_span(group['value_high'])}{count}")
    return "; ".join(parts)


def _level_text(table: pd.DataFrame, level: Level) -> str:
    if "level_min" not in table.columns or table["level_min"].isna().all():
        return f"{level.value:.4g}"
    low, high = table["level_min"].min(), table["level_max"].max()
    return f"{low:.4g}" if np.isclose(low, high) else f"each reading's own, {low:.4g}–{high:.4g}"


def _spread_lines(table: pd.DataFrame, what: str, per: str = "per curve") -> list[str]:
    """Over what the spreads run: one line when every row has the same readings, else per row."""
    spreads = table["spread"].dropna().unique() if "spread" in table.columns else []
    if len(spreads) == 1:
        return [f"{what} over {spreads[0]} {per}."]
    if len(spreads) > 1:
        return [f"{what} over: " + "; ".join(f"{row['curve']}: {row['spread']}" for _, row in table.iterrows()) + "."]
    return []


def matched_markdown(table: pd.DataFrame, level: Level, utilities: Sequence[str] = UTILITY_METRICS) -> str:
    """The matched-forgetting table as Markdown (mean ± std over the readings that reach the level)."""
    utilities = [name for name in utilities if f"{name}_mean" in table.columns]
    with_bracket = "bracket" in table.columns
    header = ["curve", "readings reaching", "lr at level", *[f"{name} at level" for name in utilities],
              *(["bracket: grid lrs and measured " + level.metric] if with_bracket else []), "note"]
    lines = [f"Level: {level.metric} {'<=' if level.below else '>='} {_level_text(table, level)} ({level.source}).",
             *_spread_lines(table, "Mean ± std"), "",
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
        if with_bracket:
            cells.append(str(row["bracket"]) if isinstance(row["bracket"], str) else "")
        cells.append(str(row["note"]) if isinstance(row["note"], str) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Runs that stopped at the level themselves (unlearn.stop_at): read where they stopped

STOP_STATUS = "stop.status"
_REASONS = {"overshot": "overshot: past the level by more than the tolerance",
            "not_reached": "not reached: the budget ended first",
            "at_start": "at start: the target was already at the level"}


def stopped_readings(runs: pd.DataFrame, setting_columns: Sequence[str], tolerance: float = 0.1,
                     utilities: Sequence[str] = UTILITY_METRICS) -> pd.DataFrame:
    """One row per run that stopped at a level (``stop.status`` set): its curve, lr, target, seed,
    data, the level it aimed at (its own: its target's retain reference), the forget value it
    reached, the deviation |value - level| / level, ``matched`` (status matched AND deviation <=
    ``tolerance``), the reason when not, the utilities and the other forget measure."""
    if STOP_STATUS not in runs.columns or runs[STOP_STATUS].isna().all():
        return pd.DataFrame()
    stopped = runs[runs[STOP_STATUS].notna()]
    columns = curve_columns(stopped, setting_columns)
    targets, data, rows = target_seeds(stopped), data_key(stopped), []
    for order, (_, curve_runs) in enumerate(stopped.groupby(columns, sort=True, dropna=False)):
        label = curve_label(curve_runs.iloc[0], columns)
        for index, run in curve_runs.iterrows():
            measure = str(run["stop.measure"])
            other = OTHER_MEASURE.get(measure, "")
            level, value = float(run["stop.level"]), float(run["stop.value"])
            deviation = abs(value - level) / abs(level) if level != 0 else (0.0 if value == 0 else math.inf)
            status = str(run[STOP_STATUS])
            matched = status == "matched" and deviation <= tolerance
            if matched:
                reason = ""
            elif status == "matched":
                reason = (f"outside tolerance: {100 * deviation:.3g} % from the level "
                          f"(report tolerance {100 * tolerance:g} %)")
            else:
                reason = _REASONS.get(status, status)
            stop_at = run.get("config.unlearn.stop_at")
            rows.append({
                "stop_at": stop_at if isinstance(stop_at, str) else f"{measure} ({run.get('stop.level_source')})",
                "measure": measure, "curve": label, "curve_order": order, "lr": float(run[LR_COLUMN]),
                "target": int(targets[index]), "seed": _integer(run.get(SEED_COLUMN)), "data": data[index],
                "run_id": run.get("run_id"), "status": status, "level": level,
                "level_source": run.get("stop.level_source"), "value": value, "deviation": deviation,
                "matched": matched, "reason": reason, "step": _stop_position(run),
                "refined": _fraction(run) < 1,
                "budget_steps": run.get("stop.budget_steps"),
                **{name: float(run[name]) if name in run.index and pd.notna(run[name]) else float("nan")
                   for name in utilities},
                "other_measure": other,
                "other_value": float(run[other]) if other in run.index and pd.notna(run[other]) else float("nan"),
            })
    return pd.DataFrame(rows)


def _fraction(run: pd.Series) -> float:
    """The share of its last step's update a stopped run kept (``unlearn.stop_refine``; 1: whole steps)."""
    value = run.get("stop.fraction")
    return float(value) if value is not None and pd.notna(value) else 1.0


def _stop_position(run: pd.Series) -> float:
    """Steps of training at the stop: ``stop.step - 1 + stop.fraction`` (whole steps unless refined)."""
    step = run.get("stop.step")
    return float(step) - 1 + _fraction(run) if step is not None and pd.notna(step) else float("nan")


def _integer(value) -> int:
    return int(value) if value is not None and pd.notna(value) else 0


def _mean_std(values: pd.Series) -> tuple[float, float]:
    values = values.dropna().astype(float)
    return (float(values.mean()) if len(values) else float("nan"),
            float(values.std(ddof=1)) if len(values) > 1 else float("nan"))


def stopped_table(readings: pd.DataFrame, utilities: Sequence[str] = UTILITY_METRICS) -> pd.DataFrame:
    """One row per (stop rule, curve, lr): readings, how many matched, the utilities and the other
    forget measure (mean and std over the matched readings), the forget value every reading
    reached (mean, std, min, max: matched or not), the levels, and what the others were."""
    utilities = [name for name in utilities if name in readings.columns]
    rows = []
    for (stop_at, _, curve, lr), group in readings.groupby(["stop_at", "curve_order", "curve", "lr"], sort=True):
        matched = group[group["matched"].astype(bool)]
        other = str(group["other_measure"].iloc[0])
        row: dict[str, object] = {
            "stop_at": stop_at, "measure": group["measure"].iloc[0], "curve": curve, "lr": lr,
            "readings": len(group), "targets": int(group["target"].nunique()), "seeds": int(group["seed"].nunique()),
            "spread": spread_text(group["target"].nunique(), group["seed"].nunique(), len(group)),
            "matched": len(matched), "all_matched": len(matched) == len(group)}
        for name in utilities:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(matched[name])
        row["value_mean"], row["value_std"] = _mean_std(group["value"])
        row["value_min"], row["value_max"] = float(group["value"].min()), float(group["value"].max())
        for stat in ("mean", "min", "max"):
            row[f"level_{stat}"] = float(group["level"].agg(stat))
        row["other_measure"] = other
        if other:  # WMDP's accuracy has no other forget measure
            row[f"{other}_mean"], row[f"{other}_std"] = _mean_std(matched["other_value"])
        row["step_mean"] = float(pd.to_numeric(group["step"], errors="coerce").mean())
        row["refined"] = int(group["refined"].astype(bool).sum())
        reasons = group.loc[~group["matched"].astype(bool), "reason"].str.split(":").str[0]
        row["not_matched"] = ", ".join(f"{count} {reason}"
                                       for reason, count in reasons.value_counts(sort=False).items())
        rows.append(row)
    return pd.DataFrame(rows)


def best_lrs(table: pd.DataFrame, utility: str = "model_utility") -> pd.DataFrame:
    """Per (stop rule, curve): the lr with the highest mean ``utility`` over its matched readings,
    among the lrs whose readings all matched (an lr where some reading missed the level is not a
    reading *at* the level). When no lr has every reading matched: among the lrs where at least two
    thirds did, the one with the most matched readings (then the highest utility), noted as such;
    else NaN lr and a note."""
    rows = []
    for (stop_at, curve), group in table.groupby(["stop_at", "curve"], sort=False):
        candidates = group[group["all_matched"].astype(bool) & (group["matched"] > 0)]
        if candidates.empty:
            partial = group[group["matched"] > 0]
            shown = ", ".join(f"lr {_number(lr)}: {matched}/{count}" for lr, matched, count
                              in zip(partial["lr"], partial["matched"], partial["readings"]))
            # Fallback: the lrs where at least two thirds of the readings matched, the most matched first
            # (a one-step jump past the tolerance on one target should not drop the method), marked so.
            mostly = partial[partial["matched"] * 3 >= partial["readings"] * 2]
            if mostly.empty:
                note = "no lr has every reading matched" + (f" ({shown})" if shown else "")
                rows.append({"stop_at": stop_at, "curve": curve, "lr": float("nan"), "note": note})
                continue
            most = mostly[mostly["matched"] == mostly["matched"].max()]
            best = most.loc[most[f"{utility}_mean"].fillna(-math.inf).idxmax()]
            rows.append({**best.to_dict(), "note": f"no lr has every reading matched ({shown}): the lr with the "
                         f"most matched readings ({int(best['matched'])}/{int(best['readings'])}), over those only"})
            continue
        best = candidates.loc[candidates[f"{utility}_mean"].fillna(-math.inf).idxmax()]
        rows.append({**best.to_dict(), "note": f"best of {len(candidates)} lr with every reading matched"
                     + (f" (of {len(group)})" if len(group) > len(candidates) else "")})
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, digits: int = 3) -> str:
    """mean ± std, the std in the mean's notation (fixed for ordinary values, so rounding noise
    shows as 0.000; scientific for tiny forget probabilities)."""
    if not np.isfinite(mean):
        return "-"
    fixed = abs(mean) >= 10 ** -digits or mean == 0
    text = f"{mean:.{digits}f}" if fixed else f"{mean:.2e}"
    if not np.isfinite(std):
        return text
    return text + (f" ± {std:.{digits}f}" if fixed else f" ± {std:.1e}")


def stopped_markdown(table: pd.DataFrame, readings: pd.DataFrame, best: pd.DataFrame, tolerance: float,
                     utilities: Sequence[str] = UTILITY_METRICS, best_by: str = "model_utility") -> str:
    """One stop rule's tables: per curve and lr (utilities over matched readings next to the forget
    value every reading reached), the readings not matched with the reason, and per curve its best lr
    (by the mean of ``best_by``)."""
    utilities = [name for name in utilities if f"{name}_mean" in table.columns]
    measure, other = str(table["measure"].iloc[0]), str(table["other_measure"].iloc[0])
    low, high = table["level_min"].min(), table["level_max"].max()
    level = f"{low:.4g}" if np.isclose(low, high) else \
        f"{low:.4g}–{high:.4g} (each run's own: its target's reference)"
    lines = [f"Stop rule `{table['stop_at'].iloc[0]}`: level {level}. A reading (one target x seed) is matched when it "
             f"stopped as matched and within {100 * tolerance:g} % of its own level; utilities and {other or 'no other measure'} are "
             f"mean ± std over the matched readings, the measured {measure} over every reading.",
             "Each lr is read over " + " or ".join(table["spread"].unique()) + " (per method; the matched "
             "column counts them).", "",
             "| " + " | ".join(["curve", "lr", "matched", *utilities, f"{measure} measured", "min–max",
                                f"{other or 'other measure'} (matched)", "mean step", "not matched"]) + " |",
             "|" + "---|" * (8 + len(utilities))]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join([
            str(row["curve"]), _number(row["lr"]), f"{row['matched']}/{row['readings']}",
            *[_cell(row[f"{name}_mean"], row[f"{name}_std"]) for name in utilities],
            _cell(row["value_mean"], row["value_std"], 4), f"{_number(row['value_min'])}–{_number(row['value_max'])}",
            _cell(row[f"{other}_mean"], row[f"{other}_std"]) if other else "-",
            (f"{row['step_mean']:.0f}" + (f" ({row['refined']} refined)" if row.get("refined") else ""))
            if np.isfinite(row["step_mean"]) else "-",
            str(row["not_matched"]) or ""]) + " |")
    missed = readings[~readings["matched"].astype(bool)]
    if not missed.empty:
        lines += ["", "Not matched (left out of the means above):", "",
                  "| curve | lr | target | seed | status | " + measure + " | level | deviation | reason |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _, row in missed.iterrows():
            lines.append(f"| {row['curve']} | {_number(row['lr'])} | {row['target']} | {row['seed']} | not matched "
                         f"(run status: {row['status']}) | {_number(row['value'])} | {_number(row['level'])} | "
                         f"{100 * row['deviation']:.3g} % | {row['reason']} |")
    lines += ["", f"Per method: the lr with the highest mean {best_by.replace('_', ' ')} among the lrs whose readings "
              "all matched "
              "(where none has all: the lr with the most matched readings, if at least two thirds, over those only).",
              "", "| " + " | ".join(["curve", "best lr", "readings", *utilities, f"{measure} measured", "note"]) + " |",
              "|" + "---|" * (5 + len(utilities))]
    for _, row in best.iterrows():
        if not np.isfinite(row["lr"]):
            lines.append("| " + " | ".join([str(row["curve"]), "-", "-", *["-" for _ in utilities], "-",
                                            str(row["note"])]) + " |")
            continue
        lines.append("| " + " | ".join([
            str(row["curve"]), _number(row["lr"]), f"{row['matched']} ({row['spread']})",
            *[_cell(row[f"{name}_mean"], row[f"{name}_std"]) for name in utilities],
            _cell(row["value_mean"], row["value_std"], 4), str(row["note"])]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Paired differences: two methods on the same target, seed and data


PAIR_KEYS = ("target", "seed", "data")


def paired_differences(readings: pd.DataFrame, utilities: Sequence[str] = UTILITY_METRICS) -> pd.DataFrame:
    """For each pair of curves, the readings paired on (target, seed, data): the difference
    (first curve minus second) of each utility, its mean, std, standard error and n pairs, and
    whether |mean| > std and |mean| > 2 standard errors. Pairs of curves with no common reading
    are left out. A paired difference removes what a target or a seed does to both methods."""
    utilities = [name for name in utilities if name in readings.columns]
    curves = list(dict.fromkeys(readings.sort_values("curve_order", kind="stable")["curve"]))
    rows = []
    for first, second in itertools.combinations(curves, 2):
        merged = readings[readings["curve"] == first].merge(readings[readings["curve"] == second],
                                                            on=list(PAIR_KEYS), suffixes=("_a", "_b"))
        if merged.empty:
            continue
        spread = spread_text(merged["target"].nunique(), merged["seed"].nunique(), len(merged))
        row: dict[str, object] = {"curve_a": first, "curve_b": second, "pairs": len(merged), "spread": spread}
        for name in utilities:
            difference = (merged[f"{name}_a"] - merged[f"{name}_b"]).dropna()
            mean, std = _mean_std(difference)
            error = std / math.sqrt(len(difference)) if np.isfinite(std) else float("nan")
            row.update({f"{name}_diff_mean": mean, f"{name}_diff_std": std, f"{name}_diff_se": error,
                        f"{name}_beyond_std": bool(np.isfinite(std) and abs(mean) > std),
                        f"{name}_beyond_2se": bool(np.isfinite(error) and abs(mean) > 2 * error)})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_markdown(table: pd.DataFrame, utilities: Sequence[str] = UTILITY_METRICS) -> str:
    """The paired differences as Markdown: A − B per utility (mean ± std over the pairs)."""
    utilities = [name for name in utilities if f"{name}_diff_mean" in table.columns]
    header = ["where", "A", "B", "pairs"]
    for name in utilities:
        header += [f"Δ {name} (A − B)", "mean beyond std / 2 SE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row.get("where", "")), str(row["curve_a"]), str(row["curve_b"]),
                 f"{row['pairs']} ({row['spread']})"]
        for name in utilities:
            flags = ["yes" if row[f"{name}_{flag}"] else "no" for flag in ("beyond_std", "beyond_2se")]
            cells += [_cell(row[f"{name}_diff_mean"], row[f"{name}_diff_std"]), " / ".join(flags)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
