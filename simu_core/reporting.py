"""Comparison tables and plots over ``runs.parquet`` (pandas + matplotlib, no Prefect).

A *setting* is a run's configuration minus its seed; the comparison table gives the mean and std
of each headline metric over the seeds of a setting. When the same configuration ran more than
once (a restarted sweep re-reports cached points), only its latest completed row counts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from simu_core.method_names import is_masked  # noqa: E402
from simu_core.stop_rule import STOP_MEASURES  # noqa: E402
from simu_core.matched import TARGET_SEED_COLUMN, has_no_effect, reference_group_columns, spread_text  # noqa: E402

HEADLINE_METRICS = ("forget_quality", "model_utility", "forget_rouge", "forget_prob", "forget_truth_ratio",
                    "retain_rouge", "retain_prob", "privleak")


def _benchmark_metrics() -> tuple[str, ...]:
    # The other benchmarks' headlines (LUME, MUSE, WMDP; the registry's rows) after the TOFU suite's:
    # a comparison shows those its runs have (all-empty columns are left out).
    from simu_core.benchmarks.info import BENCHMARK_INFO

    return tuple(dict.fromkeys((*HEADLINE_METRICS, *(name for info in BENCHMARK_INFO.values() for name in info.headline))))


ALL_HEADLINE_METRICS = _benchmark_metrics()
SEED_COLUMN = "config.run.seed"
# Config columns that never define a setting (bookkeeping, not method).
_BOOKKEEPING = ("config.run.seed", "config.run.store", "config.run.results", "config.run.name", "config.run.tags",
                "config.run.device", "config.run.fail_at_unlearn_step")


def read_runs(results: str | Path) -> pd.DataFrame:
    """Completed pipeline runs of ``<results>/runs.parquet`` (not ``simu eval`` rows), one (latest)
    row per configuration."""
    path = Path(results) / "runs.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no runs table at {path}: run `simu run` or `simu ablate` first")
    runs = pd.read_parquet(path)
    runs = runs[runs["status"] == "completed"]
    if "kind" in runs.columns:  # tables written before ``kind`` existed hold pipeline runs only
        runs = runs[runs["kind"].fillna("run") == "run"]
    if runs.empty:
        raise ValueError(f"{path} holds no completed run")
    runs = runs.sort_values("time").drop_duplicates("config_hash", keep="last").reset_index(drop=True)
    runs = fill_new_config_fields(runs)
    # A configuration re-run after a new config field appeared has a new hash but the same values.
    config_columns = [column for column in runs.columns if column.startswith("config.")]
    return runs.drop_duplicates(config_columns, keep="last").reset_index(drop=True)


def fill_new_config_fields(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows written before a config field existed hold NaN in its column; they ran with its default
    (a new field defaults to the old behaviour), so fill that in and they stay one setting. A
    benchmark-dependent field (``BENCHMARK_DEFAULTS``: TOFU's relearn.lr is 1e-5, the built-in
    benchmark's 1e-3) gets the default of each row's own benchmark."""
    import json

    from simu_core.config import BENCHMARK_DEFAULTS, SimuConfig

    defaults = SimuConfig().flat()
    runs = runs.copy()
    benchmark_column = "config.data.benchmark"
    benchmarks = runs[benchmark_column].fillna("synthetic") if benchmark_column in runs.columns \
        else pd.Series("synthetic", index=runs.index)
    for key, value in defaults.items():
        column = f"config.{key}"
        if column not in runs.columns or not runs[column].isna().any():
            continue
        if key in BENCHMARK_DEFAULTS["synthetic"]:
            fill = benchmarks.map(lambda name: BENCHMARK_DEFAULTS.get(name, BENCHMARK_DEFAULTS["synthetic"])[key])
        elif value is None:
            continue
        else:
            fill = pd.Series([json.dumps(value) if isinstance(value, (list, dict)) else value] * len(runs),
                             index=runs.index, dtype=object)
        # Numeric columns stay numeric (1 fills as 1.0 next to 1.0), so one setting stays one value.
        if runs[column].dtype.kind == "f" and pd.api.types.is_number(fill.iloc[0]):
            runs[column] = runs[column].fillna(fill.astype(float))
        else:
            runs[column] = runs[column].astype(object).where(runs[column].notna(), fill)
    return runs


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs: seeds (run and target: replicates),
    bookkeeping and settings that cannot change the unlearned model (the relearning attack, the
    knockout check, checkpointing, sharding, ...: ``simu_core.matched.has_no_effect``) excluded; a
    loss's own setting (``LOSS_SETTINGS``: DPO's preferred answers, RMU's layer, ...) counts only when
    it differs between runs of a loss that reads it."""
    columns = varying_columns(runs, lambda column: column not in _BOOKKEEPING and column != TARGET_SEED_COLUMN
                              and not has_no_effect(column))
    return [column for column in columns if _varies_where_read(runs, column)]


def _varies_where_read(runs: pd.DataFrame, column: str) -> bool:
    from simu_core.method_names import LOSS_SETTINGS, parse_method

    field = column.removeprefix("config.unlearn.")
    readers = {loss for loss, fields in LOSS_SETTINGS.items() if field in fields}
    if not column.startswith("config.unlearn.") or not readers or "config.unlearn.method" not in runs.columns:
        return True
    losses = runs["config.unlearn.method"].map(lambda method: parse_method(str(method)).loss)
    return runs.loc[losses.isin(readers), column].astype(str).nunique(dropna=False) > 1


def varying_columns(runs: pd.DataFrame, keep=lambda column: True) -> list[str]:
    """Config columns that ``keep`` accepts and whose value differs between runs."""
    return [column for column in runs.columns if column.startswith("config.") and keep(column)
            and runs[column].astype(str).nunique(dropna=False) > 1]


def _targets_vary(runs: pd.DataFrame) -> bool:
    return TARGET_SEED_COLUMN in runs.columns and runs[TARGET_SEED_COLUMN].fillna(0).nunique() > 1


def comparison_table(runs: pd.DataFrame, metrics: Sequence[str] = ALL_HEADLINE_METRICS,
                     keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds of every metric, one row per setting (``keys``: default
    :func:`setting_columns`) plus the seed count; when the runs hold several targets
    (``model.finetune.seed``), over targets x seeds, with the counts ``targets``, ``seeds`` and
    ``readings``."""
    keys = list(keys or setting_columns(runs) or ["config.unlearn.method"])
    present = [metric for metric in metrics if metric in runs.columns and runs[metric].notna().any()]
    # Raw values (not strings) so that numeric settings sort numerically (1, 3, 5, 10).
    grouped = runs.groupby(keys, sort=True, dropna=False)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    _insert_counts(table, runs, keys)
    table.index.names = [key.removeprefix("config.") for key in keys]
    return table.reset_index()


def _insert_counts(table: pd.DataFrame, runs: pd.DataFrame, keys: Sequence[str]) -> None:
    """Put over what each row's spread runs in front of ``table`` (indexed by ``keys``): targets,
    seeds and readings when the runs hold several targets, else the seed count."""
    grouped = runs.groupby(list(keys), sort=True, dropna=False)
    if _targets_vary(runs):
        table.insert(0, "readings", grouped.size())
        table.insert(0, "seeds", grouped[SEED_COLUMN].nunique() if SEED_COLUMN in runs.columns else 1)
        table.insert(0, "targets", runs.assign(_target=runs[TARGET_SEED_COLUMN].fillna(0))
                     .groupby(list(keys), sort=True, dropna=False)["_target"].nunique())
    else:
        table.insert(0, "seeds", grouped.size())


def spread_note(runs: pd.DataFrame) -> str:
    """Over what the comparison table's spreads run, for the report's text."""
    if not _targets_vary(runs):
        return "Mean ± std over seeds; one row per setting."
    targets = int(runs[TARGET_SEED_COLUMN].fillna(0).nunique())
    seeds = int(runs[SEED_COLUMN].nunique()) if SEED_COLUMN in runs.columns else 1
    return (f"Mean ± std over the readings of a setting: targets (`model.finetune.seed`, each trained with its own "
            f"retain reference) x seeds (`run.seed`); the sweep has {spread_text(targets, seeds, targets * seeds)} "
            "per setting (columns targets, seeds, readings: each row's own).")


def _run_model_metrics(results: str | Path, runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The target's and the retain reference's own metrics of each run (``metrics.parquet``, split
    ``all``): one row per (run, model), ``run_index`` the run's index in ``runs``."""
    rows = []
    for index, run_id in runs["run_id"].items():
        path = Path(results) / "runs" / str(run_id) / "metrics.parquet"
        if not path.exists():
            continue
        table = pd.read_parquet(path)
        table = table[(table["split"] == "all") & table["metric"].isin(metrics) & table["model"].isin(["target", "reference"])]
        for model, values in table.groupby("model"):
            rows.append({"run_index": index, "model": model, **dict(zip(values["metric"], values["value"]))})
    return pd.DataFrame(rows)


def model_reference_points(results: str | Path, runs: pd.DataFrame,
                           metrics: Sequence[str] = ALL_HEADLINE_METRICS) -> pd.DataFrame:
    """Mean and std, over the runs, of the target's and the retain reference's own metrics, per
    benchmark/split and target training (the ``data.*`` and ``model.*`` settings that vary; target
    seeds are pooled).

    Read from each run's ``metrics.parquet`` (split ``all``), so the table shows what perfect
    unlearning aims at (the retain reference) and where it started (the target).
    """
    frame = _run_model_metrics(results, runs, metrics)
    if frame.empty:
        return pd.DataFrame()
    keys = varying_columns(runs, lambda column: column.startswith(("config.data.", "config.model."))
                           and column != TARGET_SEED_COLUMN and not has_no_effect(column))
    for key in keys:
        frame[key] = runs.loc[frame["run_index"], key].to_numpy()
    present = [metric for metric in metrics if metric in frame.columns]
    grouped = frame.groupby(["model", *keys], sort=True, dropna=False)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "seeds", grouped.size())
    table.index.names = ["model", *[key.removeprefix("config.") for key in keys]]
    table = table.reset_index()
    table["model"] = table["model"].replace({"reference": "retain reference"})
    return table


def reference_levels(results: str | Path, runs: pd.DataFrame, metric: str = "forget_prob") -> pd.Series:
    """Each run's retain-reference ``metric`` (the forget-probability level of matched forgetting):
    the mean over the runs of its group (same target training, seed included, same benchmark,
    split and evaluation: ``simu_core.matched.reference_group_columns``), so a run whose folder
    lacks ``metrics.parquet`` gets its group's; NaN where no run of the group has it."""
    frame = _run_model_metrics(results, runs, (metric,))
    own = pd.Series(np.nan, index=runs.index, dtype=float)
    if not frame.empty and metric in frame.columns:
        reference = frame[frame["model"] == "reference"].set_index("run_index")[metric]
        own.loc[reference.index] = reference.astype(float)
    columns = reference_group_columns(runs)
    if not columns:
        return own.fillna(own.mean())
    keys = [runs[column].map(str) for column in columns]
    return own.groupby(keys, dropna=False).transform("mean")


def table_markdown(table: pd.DataFrame) -> str:
    """The comparison table as Markdown, mean ± std per metric."""
    # Headline metrics in their usual order, then any other metric in the table's own order.
    metric_names = sorted(dict.fromkeys(column.rsplit("_", 1)[0] for column in table.columns if column.endswith("_mean")),
                          key=lambda name: ALL_HEADLINE_METRICS.index(name) if name in ALL_HEADLINE_METRICS else 99)
    counts = [column for column in ("targets", "seeds", "readings") if column in table.columns]
    settings = [column for column in table.columns if not column.endswith(("_mean", "_std")) and column not in counts]
    header = settings + counts + metric_names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [_setting(row[column]) for column in settings] + [str(int(row[column])) for column in counts]
        for name in metric_names:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            if pd.isna(mean):
                cells.append("-")
            else:
                # One seed has no spread to report.
                cells.append(_fmt(mean) if pd.isna(std) else f"{_fmt(mean)} ± {_fmt(std)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setting(value) -> str:
    # Parquet round trips can turn integer settings into floats (3 -> 3.0): show them as written.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _fmt(value: float) -> str:
    return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.3f}"


def plot_tradeoff(runs: pd.DataFrame, path: str | Path, reference_points: pd.DataFrame | None = None) -> Path:
    """Forget quality (log scale) vs model utility, one colour per method, mean ± std over seeds;
    the target and the retain reference (forget quality 1 by definition) as black markers."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    keys = [column for column in setting_columns(runs) if column != "config.unlearn.method"]
    for method, rows in runs.groupby("config.unlearn.method"):
        groups = rows.groupby([rows[key].map(str) for key in keys]) if keys else [(None, rows)]
        points = [(group["model_utility"].mean(), group["model_utility"].std(), group["forget_quality"].mean(),
                   group["forget_quality"].std()) for _, group in groups]
        points = np.array(points, dtype=float).reshape(-1, 4)
        if not len(points):
            continue
        axis.errorbar(points[:, 0], points[:, 2], xerr=np.nan_to_num(points[:, 1]), yerr=np.nan_to_num(points[:, 3]),
                      fmt="o", capsize=3, label=str(method))
    if reference_points is not None and not reference_points.empty:
        for _, point in reference_points.iterrows():
            is_reference = point["model"] == "retain reference"
            quality = 1.0 if is_reference else point.get("forget_quality_mean", np.nan)
            if not np.isfinite(point.get("model_utility_mean", np.nan)):
                continue  # not computed (a retain reference's light evaluation): no point, no legend entry
            axis.scatter([point["model_utility_mean"]], [quality], marker="*" if is_reference else "X", s=140,
                         color="black", zorder=5, label=point["model"])
    axis.set_yscale("log")
    axis.set_xlabel("model utility (higher is better)")
    axis.set_ylabel("forget quality, KS p-value (log; higher is better)")
    axis.set_title("Forgetting vs utility per method (mean ± std over seeds)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(title="method")
    return _save(figure, path)


def plot_metric_vs_threshold(runs: pd.DataFrame, path: str | Path,
                             metrics: Sequence[str] = ("forget_quality", "model_utility", "forget_rouge")) -> Path | None:
    """Each metric against the mask threshold t, one line per method (masked methods only)."""
    column = "config.mask.threshold"
    masked = runs[runs["config.unlearn.method"].map(is_masked).astype(bool)]
    if masked.empty or masked[column].nunique() < 2:
        return None
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    for axis, metric in zip(np.atleast_1d(axes), metrics):
        for method, rows in masked.groupby("config.unlearn.method"):
            stats = rows.groupby(column)[metric].agg(["mean", "std"]).reset_index()
            axis.errorbar(stats[column], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=method)
        axis.set_xlabel("threshold t (fraction of layer max)")
        axis.set_ylabel(metric.replace("_", " "))
        if metric == "forget_quality":
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle("Metrics vs threshold (mean ± std over seeds)")
    return _save(figure, path)


def plot_neuron_counts(dual_analysis: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Per-layer counts of forget-critical, retain-critical and dual neurons."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    layers = dual_analysis["layer"].to_numpy()
    width = 0.27
    for offset, (column, label) in zip((-width, 0, width), (("critical_forget", "forget-critical |C_f|"),
                                                              ("critical_retain", "retain-critical |C_r|"),
                                                              ("dual", "dual |C_f ∩ C_r|"))):
        axis.bar(layers + offset, dual_analysis[column], width=width, label=label)
    axis.set_xlabel("layer")
    axis.set_ylabel("neurons")
    axis.set_xticks(layers)
    axis.set_title(title or "Critical and dual neurons per layer")
    axis.legend()
    axis.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_frontier(runs: pd.DataFrame, path: str | Path, curve_columns: Sequence[str], levels: Sequence = (),
                  reference_points: pd.DataFrame | None = None) -> Path:
    """Forgetting vs utility, one line per curve (a setting minus lr and seed) through its lr grid
    (mean over seeds per lr): forget probability vs model utility and vs retain probability, and
    forget quality vs model utility. ``levels`` (``simu_core.matched.Level``) are drawn as
    vertical lines: where matched forgetting reads each curve."""
    from simu_core.matched import LR_COLUMN, curve_label

    panels = [("forget_prob", "model_utility"), ("forget_prob", "retain_prob"), ("forget_quality", "model_utility")]
    panels = [(x, y) for x, y in panels if x in runs.columns and y in runs.columns and runs[x].notna().any()]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for axis, (x_metric, y_metric) in zip(axes[0], panels):
        # Over-forgetting reaches 1e-50 and below; the comparison happens near the level, so values
        # are drawn no lower than 1e-4 x the level (1e-8 without one), at the axis edge.
        level_values = [level.value for level in levels if level.metric == x_metric]
        floor = 1e-4 * min(level_values) if level_values else 1e-8
        for _, rows in runs.groupby(list(curve_columns), sort=True, dropna=False):
            stats = rows.groupby(LR_COLUMN)[[x_metric, y_metric]].mean().sort_index()
            axis.plot(stats[x_metric].clip(lower=floor), stats[y_metric], marker="o",
                      label=curve_label(rows.iloc[0], curve_columns))
        for index, level in enumerate(level for level in levels if level.metric == x_metric):
            # One legend entry for the levels (each target and data has its own).
            axis.axvline(level.value, color="black", linestyle="--", linewidth=1,
                         label=f"level ({level.source})" if index == 0 else None)
        if reference_points is not None and not reference_points.empty:
            for _, point in reference_points.iterrows():
                x_value = 1.0 if (x_metric == "forget_quality" and point["model"] == "retain reference") \
                    else point.get(f"{x_metric}_mean", np.nan)
                y_value = point.get(f"{y_metric}_mean", np.nan)
                if np.isfinite(x_value) and np.isfinite(y_value):
                    axis.scatter([x_value], [y_value], marker="*" if point["model"] == "retain reference" else "X",
                                 s=140, color="black", zorder=5)
                    axis.annotate(point["model"], (x_value, y_value), textcoords="offset points", xytext=(5, 5),
                                  fontsize=8)
        axis.set_xscale("log")
        if x_metric == "forget_prob":
            axis.invert_xaxis()  # forgetting grows to the right
        axis.set_xlabel(f"{x_metric.replace('_', ' ')} (log; values below {floor:.0e} drawn at {floor:.0e})")
        axis.set_ylabel(y_metric.replace("_", " "))
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Trade-off curves over the lr grid (mean over seeds per lr)")
    return _save(figure, path)


def read_trajectories(results: str | Path, runs: pd.DataFrame, curve_columns: Sequence[str]) -> pd.DataFrame:
    """Every stopped run's ``trajectory.parquet`` (the forget measures every ``unlearn.eval_every``
    steps) stacked, with its run id, curve label, stop measure and own level; empty when none."""
    from simu_core.matched import STOP_STATUS, curve_label

    if STOP_STATUS not in runs.columns:
        return pd.DataFrame()
    frames = []
    for _, row in runs[runs[STOP_STATUS].notna()].iterrows():
        path = Path(results) / "runs" / str(row["run_id"]) / "trajectory.parquet"
        if path.exists():
            frames.append(pd.read_parquet(path).assign(
                run_id=row["run_id"], curve=curve_label(row, curve_columns), measure=row["stop.measure"],
                level=float(row["stop.level"]), status=row[STOP_STATUS]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


#: A trajectory's retain measure, the first present (``simu_core.stopping``'s checks).
TRAJECTORY_RETAIN_MEASURES = ("retain_prob", "knowmem_retain")


def plot_trajectories(trajectories: pd.DataFrame, path: str | Path) -> Path:
    """Per stop measure, two panels: the measure (log) against retain probability, and against the
    step; one line per run, one colour per curve, the levels dashed (each target has its own)."""
    measures = list(dict.fromkeys(trajectories["measure"]))
    figure, axes = plt.subplots(len(measures), 2, figsize=(11, 4.2 * len(measures)), squeeze=False)
    colours = {curve: f"C{index % 10}" for index, curve in enumerate(dict.fromkeys(trajectories["curve"]))}
    for row_axes, measure in zip(axes, measures):
        rows = trajectories[trajectories["measure"] == measure]
        levels = sorted(rows["level"].dropna().unique())
        # Over-forgetting reaches 1e-50; drawn no lower than 1e-4 x the lowest level, at the axis edge.
        floor = 1e-4 * min(levels) if levels and min(levels) > 0 else 1e-12
        labelled = set()
        # The stop checks' retain measure: the TOFU suite's retain probability, MUSE's KnowMem on retain;
        # WMDP's checks measure none (the left panel stays empty).
        retain = next((name for name in TRAJECTORY_RETAIN_MEASURES if name in rows and rows[name].notna().any()), None)
        for (curve, _), run in rows.groupby(["curve", "run_id"], sort=False):
            # Refined stops (unlearn.stop_refine) measure fractions of a step; older trajectories have none.
            fraction = run["fraction"].fillna(1.0) if "fraction" in run else 1.0
            run = run.assign(step=run["step"] - 1 + fraction).sort_values("step", kind="stable")
            values = run[measure].astype(float).clip(lower=floor)
            label = None if curve in labelled else curve
            labelled.add(curve)
            if retain is not None:
                row_axes[0].plot(values, run[retain], marker=".", color=colours[curve], alpha=0.8, label=label)
            row_axes[1].plot(run["step"], values, marker=".", color=colours[curve], alpha=0.8, label=label)
        for index, level in enumerate(levels):
            name = "level" if index == 0 else None
            row_axes[0].axvline(level, color="black", linestyle="--", linewidth=1, label=name)
            row_axes[1].axhline(level, color="black", linestyle="--", linewidth=1, label=name)
        title = measure.replace("_", " ")
        row_axes[0].set_xscale("log")
        if STOP_MEASURES.get(measure) == "<=":
            row_axes[0].invert_xaxis()  # forgetting grows to the right
        row_axes[0].set_xlabel(f"{title} (log)")
        row_axes[0].set_ylabel({"retain_prob": "retain probability (retain sample)",
                                "knowmem_retain": "KnowMem on retain"}.get(retain, "no retain measure checked"))
        row_axes[1].set_yscale("log")
        row_axes[1].set_xlabel("unlearning step")
        row_axes[1].set_ylabel(f"{title} (log)")
        for axis in row_axes:
            axis.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=7)
        row_axes[0].set_title(f"Stopped at {title}: each run's path to its level ({len(levels)} distinct)")
    return _save(figure, path)


def plot_knockout(summary: pd.DataFrame, curve: pd.DataFrame | None, path: str | Path, title: str = "") -> Path:
    """Knockout check: forget and retain drops per neuron set (bars, std over random draws), and
    the drops as the number of knocked-out neurons per layer grows (top-k by score vs random)."""
    with_curve = curve is not None and not curve.empty
    figure, axes = plt.subplots(1, 2 if with_curve else 1, figsize=(11 if with_curve else 5.5, 4.2), squeeze=False)
    axis = axes[0][0]
    positions = np.arange(len(summary))
    for offset, (column, label) in zip((-0.2, 0.2), (("forget_drop", "forget items"), ("retain_drop", "retain items"))):
        axis.bar(positions + offset, summary[column], width=0.4, yerr=summary[f"{column}_std"].fillna(0), capsize=3,
                 label=label)
    axis.set_xticks(positions)
    axis.set_xticklabels([f"{kind}\n({int(n)} neurons)" for kind, n in zip(summary["kind"], summary["neurons"])])
    axis.set_ylabel("drop of mean answer log-prob (nats/token)")
    axis.set_title(title or "Knockout of neuron sets (target)")
    axis.legend()
    axis.grid(True, axis="y", alpha=0.3)
    if with_curve:
        axis = axes[0][1]
        for kind, style in (("top_forget_score", "-"), ("random", "--")):
            rows = curve[curve["kind"] == kind]
            if rows.empty:
                continue
            stats = rows.groupby("k")[["forget_drop", "retain_drop"]].mean()
            name = "top-k by score" if kind != "random" else "random k"
            axis.plot(stats.index, stats["forget_drop"], style, marker="o", color="C0", label=f"{name}: forget")
            axis.plot(stats.index, stats["retain_drop"], style, marker="s", color="C1", label=f"{name}: retain")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("neurons knocked out per layer (k)")
        axis.set_ylabel("drop of mean answer log-prob")
        axis.set_title("Knockout size curve")
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    return _save(figure, path)


def knockout_tables(results: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """The knockout summaries of the masked runs, one per distinct mask and target (latest run of
    each): the mask settings, the target and data settings that vary between the runs (each
    target has its own neurons: none is dropped), then the per-set rows of
    ``knockout_summary.parquet``."""
    mask_columns = [column for column in runs.columns if column.startswith(("config.mask.", "config.attribution."))
                    and column != "config.mask.rule"]
    # The check reads the target on the benchmark's items: each target and data is its own check.
    target_columns = varying_columns(runs, lambda column: column.startswith(("config.model.", "config.data."))
                                     and not has_no_effect(column))
    group_columns = mask_columns + target_columns
    frames = []
    masked = runs[runs["config.unlearn.method"].map(is_masked).astype(bool)]
    keys = [masked[column].map(str) for column in group_columns]
    for _, rows in masked.groupby(keys, sort=False, dropna=False) if group_columns else []:
        # The latest run of this mask that ran the check (knockout.enabled may have been off since).
        with_check = [row for _, row in rows.sort_values("time").iterrows()
                      if (Path(results) / "runs" / str(row["run_id"]) / "knockout_summary.parquet").exists()]
        if with_check:
            latest = with_check[-1]
            path = Path(results) / "runs" / str(latest["run_id"]) / "knockout_summary.parquet"
            frame = pd.read_parquet(path)
            # Inserted at 0 in turn: mask.variant, mask.threshold, mask.score, then the target settings.
            for column in [*reversed(target_columns), "config.mask.score", "config.mask.threshold",
                           "config.mask.variant"]:
                if column in latest.index:
                    frame.insert(0, column.removeprefix("config."), latest[column])
            frame["run_id"] = latest["run_id"]
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    # Stable order: by mask, then target (string keys above keep NaN settings groupable).
    order = [column.removeprefix("config.") for column in ("config.mask.score", "config.mask.threshold",
                                                             "config.mask.variant", *target_columns)
             if column.removeprefix("config.") in table.columns]
    return table.sort_values(order, kind="stable").reset_index(drop=True) if order else table


# ----------------------------------------------------------------------------------------------
# Relearning attack (relearn.enabled): metric.relearn_* in the runs table, curves in the run folders

RELEARN_METRICS = ("relearn_recovery", "relearn_recovery_rouge", "relearn_regained")
#: Each model's headline measure before and after the attack: ``relearn_<model>_<measure>_<phase>``
#: (forget_prob on TOFU-style benchmarks, verbmem_forget on MUSE, wmdp_accuracy on WMDP).
RELEARN_MODEL_FIGURE = re.compile(r"^metric\.relearn_(unlearned|reference|target)_(\w+)_(before|after)$")


def relearned_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that ran the relearning attack: a step count or a recovery (recovery is NaN in a run
    without a retain reference)."""
    columns = [column for column in ("metric.relearn_steps", "metric.relearn_recovery") if column in runs.columns]
    return runs[runs[columns].notna().any(axis=1)] if columns else runs.iloc[:0]


def relearn_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the relearning figures per setting (runs that ran the attack);
    empty when none did. Columns without the ``relearn_`` prefix."""
    models = ("unlearned", "reference", "target")
    figures = sorted((column for column in runs.columns if RELEARN_MODEL_FIGURE.match(column)),
                     key=lambda column: (models.index(RELEARN_MODEL_FIGURE.match(column).group(1)), column.endswith("after")))
    columns = {**{f"metric.{name}": name.removeprefix("relearn_") for name in RELEARN_METRICS},
               **{column: column.removeprefix("metric.relearn_") for column in figures}}
    attacked = relearned_runs(runs).rename(columns=columns)
    if attacked.empty:
        return pd.DataFrame()
    return comparison_table(attacked, metrics=[name for name in columns.values() if name in attacked.columns],
                            keys=relearn_setting_columns(attacked))


def relearn_setting_columns(runs: pd.DataFrame) -> list[str]:
    """The settings of the relearning table: the unlearned model's and the attack's own
    (``relearn.*``, which name no other setting)."""
    return [*setting_columns(runs), *varying_columns(runs, lambda column: column.startswith("config.relearn."))]


def relearn_curves(results: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Every attacked run's ``relearn_curve.parquet`` stacked, with its setting columns and seed."""
    frames, columns = [], [*relearn_setting_columns(runs), SEED_COLUMN, TARGET_SEED_COLUMN]
    for _, row in runs.iterrows():
        path = Path(results) / "runs" / str(row["run_id"]) / "relearn_curve.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
            for column in columns:
                frame[column] = row.get(column, 0)  # no target-seed column: target 0
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_relearning(curves: pd.DataFrame, path: str | Path) -> Path:
    """The headline measure during the attack (forget probability of the held-out forget items; VerbMem
    on MUSE; accuracy on WMDP): each setting's unlearned model (mean ± std over seeds), and the target
    and the retain reference (dashed, over all runs)."""
    from simu_core.attacks.robustness import HEADLINE_MEASURES
    from simu_core.matched import curve_label

    measure = next(name for name in HEADLINE_MEASURES if name in curves.columns)

    columns = [column for column in curves.columns if column.startswith("config.")
               and column not in (SEED_COLUMN, TARGET_SEED_COLUMN)]
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    unlearned = curves[curves["model"] == "unlearned"]
    groups = unlearned.groupby(columns, sort=True, dropna=False) if columns else [((), unlearned)]
    for _, group in groups:
        stats = group.groupby("step")[measure].agg(["mean", "std"])
        label = curve_label(group.iloc[0], columns) if columns else "unlearned"
        axis.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=label)
    for model, style in (("target", "k--"), ("reference", "k:")):
        stats = curves[curves["model"] == model].groupby("step")[measure].mean()
        if not stats.empty:
            axis.plot(stats.index, stats.to_numpy(), style, label="retain reference" if model == "reference" else model)
    axis.set_xlabel("relearning steps")
    axis.set_ylabel("forget probability (held-out forget items)" if measure == "forget_prob" else measure)
    axis.set_title("Relearning attack")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------
# Sequential deletion requests (data.requests): one runs-table row per request, kind "request"

REQUEST_METRICS = ("model_utility", "forget_quality", "forget_prob", "retain_prob")
REQUEST_INDEX, REQUEST_ITEMS = "request.index", "request.items"


def read_request_runs(results: str | Path) -> pd.DataFrame:
    """Completed rows of sequential deletion runs (kind ``request``), the latest per configuration
    and request; empty when there are none."""
    path = Path(results) / "runs.parquet"
    runs = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    if runs.empty or "kind" not in runs.columns or REQUEST_INDEX not in runs.columns:
        return pd.DataFrame()
    rows = runs[(runs["status"] == "completed") & (runs["kind"] == "request")]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.sort_values("time").drop_duplicates(["config_hash", REQUEST_INDEX], keep="last")
    rows = fill_new_config_fields(rows)
    config_columns = [column for column in rows.columns if column.startswith("config.")]
    rows = rows.drop_duplicates([*config_columns, REQUEST_INDEX], keep="last")
    return rows.astype({REQUEST_INDEX: int, REQUEST_ITEMS: int}).reset_index(drop=True)


def request_table(rows: pd.DataFrame, metrics: Sequence[str] = REQUEST_METRICS) -> pd.DataFrame:
    """Mean and std of each metric (model utility, forget quality, forget and retain probability) per
    setting (method, ...) and request index, with the forget items seen so far (columns ``request``
    and ``items so far``). The spread runs over targets x seeds when the rows hold several targets
    (columns ``targets``, ``seeds``, ``readings``), else over seeds. Stopped runs (``unlearn.stop_at``)
    add how many of the readings stopped at the level within the tolerance (``matched``, "k/n"), their
    mean stop step and the mean level (each request's: the reference on its own items): a request whose
    run never reached the level, or overshot it, is not matched."""
    keys = (setting_columns(rows) or ["config.unlearn.method"]) + [REQUEST_INDEX, REQUEST_ITEMS]
    present = [metric for metric in metrics if metric in rows.columns]
    grouped = rows.groupby(keys, sort=True, dropna=False)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    if "stop.matched" in rows.columns and rows["stop.matched"].notna().any():
        matched = rows["stop.matched"].fillna(False).astype(bool)
        counts = matched.groupby([rows[key] for key in keys], sort=True, dropna=False).agg(["sum", "size"])
        table["matched"] = [f"{int(done)}/{int(size)}" for done, size in zip(counts["sum"], counts["size"])]
        table["mean step"] = grouped["stop.step"].mean().round(0) if "stop.step" in rows.columns else None
        if "stop.level" in rows.columns:  # each request's level: the reference on its own items
            table["level"] = grouped["stop.level"].mean().map(_fmt)
    _insert_counts(table, rows, keys)
    table.index.names = [key.removeprefix("config.") for key in keys]
    return table.reset_index().rename(columns={REQUEST_INDEX: "request", REQUEST_ITEMS: "items so far"})


def request_item_table(results: str | Path, rows: pd.DataFrame, column: str = "probability") -> pd.DataFrame:
    """Each request's own forget items followed through the later requests: per setting and request
    i, the mean of the unlearned model's per-item ``column`` (``items.parquet``; ``probability``: the
    forget probability, whose mean over the items is the headline ``forget_prob``) on request j's items (j <= i; columns ``request j``),
    mean over the readings (targets x seeds; ``readings``). Reads ``request<i>/items.parquet`` and
    ``request<j>/request_items.parquet`` of every run folder; runs written before the latter existed
    are left out. Empty when no run has them."""
    keys = setting_columns(rows) or ["config.unlearn.method"]
    records = []
    for run_id, run_rows in rows.groupby("run_id", sort=False):
        folder = Path(results) / "runs" / str(run_id)
        owners: dict[str, int] = {}
        for index in sorted(run_rows[REQUEST_INDEX].astype(int)):
            own = folder / f"request{index}" / "request_items.parquet"
            if not own.is_file():
                owners = {}
                break
            owners.update({item: index for item in pd.read_parquet(own)["item_id"]})
        if not owners:
            continue
        for _, row in run_rows.iterrows():
            index = int(row[REQUEST_INDEX])
            items = pd.read_parquet(folder / f"request{index}" / "items.parquet")
            forget = items[(items["split"] == "forget") & (items["model"] == "unlearned")]
            owner = forget["item_id"].map(owners)
            for request, values in forget.groupby(owner)[column]:
                records.append({**{key: row[key] for key in keys}, "run_id": run_id, "after request": index,
                                "request": int(request), "value": float(values.mean())})
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records)
    group = [*keys, "after request"]
    table = frame.groupby([*group, "request"], sort=True, dropna=False)["value"].mean().unstack("request")
    table.columns = [f"request {column} items" for column in table.columns]
    table.insert(0, "readings", frame.groupby(group, dropna=False)["run_id"].nunique())
    table.index.names = [key.removeprefix("config.") for key in group]
    return table.reset_index()


def request_paired(rows: pd.DataFrame, metrics: Sequence[str] = ("model_utility", "retain_prob", "forget_prob")
                   ) -> pd.DataFrame:
    """After each request, each pair of settings compared on the same readings (same target
    ``model.finetune.seed`` and seed ``run.seed``): A − B of each metric, mean ± std over the
    pairs (:func:`simu_core.matched.paired_differences`), column ``where`` = "after request i".
    Every reading is paired, matched or not: the forget-probability difference says whether the two
    forgot as much; the requests table's ``matched`` column says how many stopped at their level."""
    from simu_core.matched import curve_columns, curve_label, paired_differences

    if rows.empty:
        return pd.DataFrame()
    columns = curve_columns(rows, setting_columns(rows))
    labels = {index: curve_label(row, columns) for index, row in rows.iterrows()}
    order = {label: number for number, label in enumerate(dict.fromkeys(sorted(labels.values())))}
    readings = pd.DataFrame({
        "curve": pd.Series(labels), "curve_order": pd.Series(labels).map(order),
        "target": rows[TARGET_SEED_COLUMN].fillna(0).astype(int) if TARGET_SEED_COLUMN in rows else 0,
        "seed": rows[SEED_COLUMN].fillna(0).astype(int) if SEED_COLUMN in rows else 0,
        "data": 0, REQUEST_INDEX: rows[REQUEST_INDEX].astype(int),
        **{name: rows[name] for name in metrics if name in rows.columns}})
    tables = [paired_differences(group, metrics).assign(where=f"after request {index}")
              for index, group in readings.groupby(REQUEST_INDEX, sort=True)]
    tables = [table for table in tables if not table.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def request_item_markdown(table: pd.DataFrame) -> str:
    """:func:`request_item_table` as Markdown (a request's items before it was made: blank)."""
    value_columns = [column for column in table.columns if column.startswith("request ") and column.endswith(" items")]
    shown = table.assign(**{column: table[column].map(lambda value: "" if pd.isna(value) else _fmt(value))
                            for column in value_columns})
    return table_markdown(shown)


def plot_requests(rows: pd.DataFrame, path: str | Path) -> Path:
    """Model utility and forget quality (log) against the number of requests, one line per setting
    (method, ...), mean ± std over seeds."""
    from simu_core.matched import curve_label

    columns = setting_columns(rows) or ["config.unlearn.method"]
    figure, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for _, group in rows.groupby(columns, sort=True, dropna=False):
        label = curve_label(group.iloc[0], columns)
        for axis, metric in zip(axes, ("model_utility", "forget_quality")):
            stats = group.groupby(REQUEST_INDEX)[metric].agg(["mean", "std"])
            axis.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=label)
    for axis, metric in zip(axes, ("model_utility", "forget_quality")):
        axis.set_xlabel("deletion requests so far")
        axis.set_ylabel(metric.replace("_", " ") + (" (KS p-value, log)" if metric == "forget_quality" else ""))
        axis.xaxis.get_major_locator().set_params(integer=True)
        if metric == "forget_quality":
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Sequential deletion requests (forget measures on every request so far; mean ± std over seeds)")
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------
# Attacks (``attacks``): metric.attack_* in the runs table, robustness.parquet in the run folders

#: Per attack, the figures the robustness table shows (metric.attack_<attack>_<figure>).
ATTACK_FIGURES = ("recovery", "regained", "unlearned_after", "reference_after")
#: The OpenUnlearning meta-evaluation's robustness figures (metric.<name>).
OPENUNLEARNING_FIGURES = ("attack_relearn_r", "attack_quantize_q", "attack_robustness")


def attack_metric_columns(runs: pd.DataFrame) -> list[str]:
    """The runs table's attack figures (``metric.attack_*``) that hold a value."""
    return [column for column in runs.columns if column.startswith("metric.attack_") and runs[column].notna().any()]


def attack_readings(runs: pd.DataFrame) -> pd.DataFrame:
    """One reading per attacked run (no stop level): its curve (the setting columns), target, seed,
    data and attack figures; the readings of a fixed-budget sweep."""
    from simu_core.matched import curve_columns, curve_label, data_key, target_seeds

    columns = attack_metric_columns(runs)
    attacked = runs[runs[columns].notna().any(axis=1)] if columns else runs.iloc[:0]
    if attacked.empty:
        return pd.DataFrame()
    curves = curve_columns(attacked, setting_columns(attacked))
    targets, data, rows = target_seeds(attacked), data_key(attacked), []
    groups = attacked.groupby(curves, sort=True, dropna=False) if curves else [((), attacked)]
    for order, (_, group) in enumerate(groups):
        label = curve_label(group.iloc[0], curves) if curves else str(group.iloc[0]["config.unlearn.method"])
        for index, run in group.iterrows():
            rows.append({"curve": label, "curve_order": order, "target": int(targets[index]),
                         "seed": int(run.get(SEED_COLUMN, 0) or 0), "data": data[index],
                         **{column: run[column] for column in columns}})
    return pd.DataFrame(rows)


def attack_setting_groups(attacked: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The attacked runs split by the attacks' own settings that differ between them (``relearn.*``,
    ``attack.*``, ``attacks``), each with its label ("relearn.data=retain_only"); one unlabelled group
    when none differs."""
    columns = varying_columns(
        attacked, lambda column: column.startswith(("config.relearn.", "config.attack.")) or column == "config.attacks")
    if not columns:
        return [("", attacked)]
    keys = attacked[columns].astype(str)
    return [(", ".join(f"{column.removeprefix('config.')}={value}" for column, value in zip(columns, key)),
             attacked.loc[group.index])
            for key, group in keys.groupby(columns, sort=True)]


def robustness_table(readings: pd.DataFrame) -> pd.DataFrame:
    """Per curve, the readings and each attack figure's mean and std over them (columns
    ``<figure>_mean`` / ``<figure>_std`` without the ``metric.attack_`` prefix)."""
    columns = [column for column in readings.columns if column.startswith("metric.attack_")]
    grouped = readings.sort_values("curve_order", kind="stable").groupby("curve", sort=False)
    table = grouped[columns].agg(["mean", "std"])
    table.columns = [f"{column.removeprefix('metric.attack_')}_{stat}" for column, stat in table.columns]
    table.insert(0, "readings", grouped.size())
    table.insert(0, "spread", [spread_text(group["target"].nunique(), group["seed"].nunique(), len(group))
                               for _, group in grouped])
    return table.reset_index()


def robustness_markdown(table: pd.DataFrame) -> str:
    """Methods x attacks: recovery mean ± std per attack (forget probability, unlearned / reference
    after the attack; regained where no reading has a retain reference), then OpenUnlearning's R, Q
    and HM where they were computed."""
    from simu_core.attacks.names import ATTACKS
    from simu_core.matched import _cell

    attacks = [attack for attack in ATTACKS if f"{attack}_recovery_mean" in table.columns]
    quantized = sorted({column.split("_")[1] for column in table.columns
                        if column.startswith("quantize_") and column.endswith("bit_recovery_mean")},
                       key=lambda bits: -int(bits.removesuffix("bit")))
    recovery = [(f"quantize {bits}", f"quantize_{bits}_recovery") for bits in quantized] if quantized else []
    recovery += [(attack.replace("_", " "), f"{attack}_recovery") for attack in attacks if attack != "quantize"]
    # Without a retain reference (WMDP) recovery is undefined everywhere: show what came back of what was removed.
    figure = "recovery"
    if recovery and all(table[f"{key}_mean"].isna().all() for _, key in recovery):
        figure = "regained"
        recovery = [(name, key.removesuffix("_recovery") + "_regained") for name, key in recovery]
    extra = [(name, name.removeprefix("attack_")) for name in OPENUNLEARNING_FIGURES
             if f"{name.removeprefix('attack_')}_mean" in table.columns]
    header = ["curve", "readings", *[f"{figure}: {name}" for name, _ in recovery],
              *[{"attack_relearn_r": "R (relearn)", "attack_quantize_q": "Q (quantize)",
                 "attack_robustness": "HM(R, Q)"}[name] for name, _ in extra]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row["curve"]), f"{row['readings']} ({row['spread']})"]
        cells += [_cell(row[f"{key}_mean"], row[f"{key}_std"]) for _, key in recovery]
        cells += [_cell(row[f"{key}_mean"], row[f"{key}_std"]) for _, key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_robustness(table: pd.DataFrame, path: str | Path) -> Path:
    """Recovery per attack (x) and curve (bars), mean ± std over the readings; 1 = like the retain reference."""
    from simu_core.attacks.names import ATTACKS

    keys = []
    for column in table.columns:
        if column.endswith("bit_recovery_mean") and column.startswith("quantize_"):
            keys.append(column.removesuffix("_recovery_mean"))
    keys = sorted(keys, key=lambda key: -int(key.split("_")[1].removesuffix("bit")))
    keys += [attack for attack in ATTACKS if attack != "quantize" and f"{attack}_recovery_mean" in table.columns]
    figure, axis = plt.subplots(figsize=(max(6.5, 1.3 * len(keys) + 2), 4.2))
    width = 0.8 / max(len(table), 1)
    positions = np.arange(len(keys))
    for offset, (_, row) in enumerate(table.iterrows()):
        means = [row[f"{key}_recovery_mean"] for key in keys]
        stds = [row.get(f"{key}_recovery_std", 0.0) for key in keys]
        axis.bar(positions + offset * width - 0.4 + width / 2, means, width,
                 yerr=np.nan_to_num(np.asarray(stds, dtype=float)), capsize=2, label=str(row["curve"]))
    axis.axhline(1.0, color="k", linestyle=":", linewidth=1, label="retain reference")
    axis.set_xticks(positions, [key.replace("_", " ") for key in keys])
    axis.set_ylabel("recovery (forget prob., unlearned / reference)")
    axis.set_title("Attacks: recovery of the forgotten answers")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, path)
