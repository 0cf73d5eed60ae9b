"""The comparison report as a flow: table (Markdown), plots (PNG), linked from Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from simu_core.method_names import is_masked
from simu_core import reporting


def write_report(results: str | Path, out_dir: str | Path | None = None, fq_level: float = 0.05,
                 tolerance: float = 0.1, best_by: str | None = None) -> dict[str, Any]:
    """Read the runs table; write ``report.md`` and the plots; return their paths and the table.

    ``fq_level``: the forget-quality level of the matched-forgetting table (the retain
    reference's own forget quality is 1 by definition, so it cannot serve as the level).
    ``tolerance``: how far (relative) from its level a run that stopped at it (``unlearn.stop_at``)
    may be and still count as matched. ``best_by``: the utility whose mean picks each method's best lr
    among stopped runs (default: the benchmark's first, TOFU's model utility); a ValueError names the
    utilities when it is not one of them.
    """
    results = Path(results).resolve()
    out = Path(out_dir).resolve() if out_dir else results / "report"
    requests = reporting.read_request_runs(results)
    try:
        runs = reporting.read_runs(results)
    except ValueError:  # no single-forget-set run: the report holds the sequential requests only
        if requests.empty:
            raise
        return _requests_only_report(results, out, requests)
    table = reporting.comparison_table(runs)
    markdown_table = reporting.table_markdown(table)
    points = reporting.model_reference_points(results, runs)
    plots = {"tradeoff": reporting.plot_tradeoff(runs, out / "tradeoff.png", points)}
    threshold_plot = reporting.plot_metric_vs_threshold(runs, out / "metrics_vs_threshold.png")
    if threshold_plot is not None:
        plots["metrics_vs_threshold"] = threshold_plot
    masked = runs[runs["config.unlearn.method"].map(is_masked).astype(bool)]
    if not masked.empty:
        latest = masked.iloc[-1]
        analysis_path = results / "runs" / str(latest["run_id"]) / "dual_analysis.parquet"
        if analysis_path.exists():
            analysis = pd.read_parquet(analysis_path)
            threshold = float(latest["config.mask.threshold"])
            analysis = analysis[(analysis["threshold"] - threshold).abs() < 1e-12]
            plots["neuron_counts"] = reporting.plot_neuron_counts(
                analysis, out / "neuron_counts.png",
                title=f"Critical and dual neurons per layer (t={latest['config.mask.threshold']})")
    table.to_csv(out / "comparison.csv", index=False)
    lines = [f"# simu comparison report ({len(runs)} runs)", "", f"Results folder: `{results}`", "",
             reporting.spread_note(runs), "", markdown_table, ""]
    if not points.empty:
        points.to_csv(out / "reference_points.csv", index=False)
        lines += ["Reference points: the target before unlearning and the retain reference (trained without the "
                  "forget set; forget quality 1.0 by definition), mean ± std over the same runs.", "",
                  reporting.table_markdown(points), ""]
    lines += _matched_forgetting_section(results, runs, points, out, plots, fq_level, tolerance, best_by)
    lines += _knockout_section(results, runs, out, plots)
    lines += _relearning_section(results, runs, out, plots)
    lines += _robustness_section(runs, out, plots, tolerance)
    lines += _requests_section(results, requests, out, plots)
    lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"report": str(out / "report.md"), "plots": {k: str(v) for k, v in plots.items()}, "markdown": markdown,
            "table": table}


@flow(name="simu-report", log_prints=True)
def simu_report(results: str = "results", out_dir: str | None = None, fq_level: float = 0.05,
                tolerance: float = 0.1, best_by: str | None = None) -> dict[str, Any]:
    """Write the comparison report and publish it (and links to the plots) as Prefect artifacts."""
    written = write_report(results, out_dir, fq_level, tolerance, best_by)
    create_markdown_artifact(markdown=written["markdown"], key="simu-comparison", description="comparison table")
    create_link_artifact(link=Path(written["report"]).as_uri(), link_text="report.md", key="simu-report")
    for name, path in written["plots"].items():
        create_link_artifact(link=Path(path).as_uri(), link_text=Path(path).name, key=f"simu-plot-{name.replace('_', '-')}")
    print(written["markdown"])
    return {key: value for key, value in written.items() if key != "table"}


def _matched_forgetting_section(results: Path, runs: pd.DataFrame, points: pd.DataFrame, out: Path, plots: dict,
                                fq_level: float, tolerance: float, best_by: str | None = None) -> list[str]:
    """Matched forgetting: runs that stopped at a level (``unlearn.stop_at``) read where they
    stopped; fixed-budget lr grids interpolated at the level; the paired differences between
    methods; a clear note instead of a table when the runs cannot give one."""
    from simu_core.matched import STOP_STATUS, paired_markdown, utility_metrics

    lines = ["## Comparison at matched forgetting", ""]
    is_stopped = runs[STOP_STATUS].notna() if STOP_STATUS in runs.columns else pd.Series(False, index=runs.index)
    paired: list[pd.DataFrame] = []
    if is_stopped.any():
        lines += _stopped_section(results, runs[is_stopped], out, plots, tolerance, paired, best_by)
    if not is_stopped.all():
        lines += _interpolated_section(results, runs[~is_stopped], points, out, plots, fq_level, paired)
    if paired:
        table = pd.concat(paired, ignore_index=True)
        table.to_csv(out / "paired_differences.csv", index=False)
        lines += ["### Paired differences between methods", "",
                  "Each pair of methods on the same readings (same target `model.finetune.seed`, seed `run.seed` and "
                  "data): the difference A − B of each utility, mean ± std over the pairs; 'mean beyond std / 2 SE' "
                  "says whether |mean| exceeds the pairs' standard deviation and two standard errors "
                  "(std / sqrt(pairs)). Stopped runs: each method at its best lr; lr grids: the interpolated readings.",
                  "", paired_markdown(table, utility_metrics(runs)), ""]
    return lines


def _stopped_section(results: Path, runs: pd.DataFrame, out: Path, plots: dict, tolerance: float,
                     paired: list, best_by: str | None = None) -> list[str]:
    """Runs that stopped at a level: per stop measure, the table per method and lr with the forget
    value every reading reached, the readings not matched, each method's best lr, the paired
    differences there, and the trajectories plot."""
    from simu_core.matched import (best_lrs, curve_columns, paired_differences, stopped_markdown, stopped_readings,
                                   stopped_table, utility_metrics)

    settings = reporting.setting_columns(runs)
    utilities = utility_metrics(runs)  # the runs' benchmarks' (TOFU suite: model utility, retain probability)
    if best_by is not None and best_by not in utilities:
        raise ValueError(f"--best-by {best_by!r}: the stopped runs' utilities are {list(utilities)}")
    selector = best_by or utilities[0]
    readings = stopped_readings(runs, settings, tolerance, utilities)
    lines = ["### Stopped at the level (`unlearn.stop_at`)", "",
             "Each run stopped at the first check (every `unlearn.eval_every` steps) that reached its level; no "
             "interpolation. A `reference` level is each run's own target's retain reference's value.", ""]
    for measure, by_measure in readings.groupby("measure", sort=True):
        tables, bests = [], []
        for stop_at, rule_readings in by_measure.groupby("stop_at", sort=True):
            table = stopped_table(rule_readings, utilities)
            best = best_lrs(table, selector)
            tables.append(table)
            bests.append(best)
            lines += [f"#### {stop_at}", "", stopped_markdown(table, rule_readings, best, tolerance, utilities, selector),
                      ""]
            at_best = rule_readings.merge(best.dropna(subset=["lr"])[["curve", "lr"]], on=["curve", "lr"])
            at_best = at_best[at_best["matched"].astype(bool)]
            differences = paired_differences(at_best, utilities)
            if not differences.empty:
                paired.append(differences.assign(where=f"stopped, {stop_at}, best lr by {selector}"))
        pd.concat(tables, ignore_index=True).to_csv(out / f"matched_stopped_{measure}.csv", index=False)
        by_measure.to_csv(out / f"matched_stopped_{measure}_readings.csv", index=False)
        pd.concat(bests, ignore_index=True).to_csv(out / f"matched_stopped_{measure}_best.csv", index=False)
    trajectories = reporting.read_trajectories(results, runs, curve_columns(runs, settings))
    if not trajectories.empty:
        plots["trajectories"] = reporting.plot_trajectories(trajectories, out / "trajectories.png")
    return lines


def _interpolated_section(results: Path, runs: pd.DataFrame, points: pd.DataFrame, out: Path, plots: dict,
                          fq_level: float, paired: list) -> list[str]:
    """Fixed-budget lr grids: the matched-forgetting tables (forget probability at each target's
    own retain reference level, forget quality at ``fq_level``) and the frontier plot."""
    from simu_core.matched import (LR_COLUMN, Level, MatchedForgettingError, curve_columns, matched_markdown,
                                   matched_readings, paired_differences, summarize_readings)

    lines = []
    if LR_COLUMN not in runs.columns or runs[LR_COLUMN].nunique() < 2:
        return lines + ["Not computed: the runs hold fewer than 2 learning rates (sweep `unlearn.lr`, the same grid "
                        "for every method, e.g. `--grid unlearn.lr=1e-4,2e-4,5e-4,1e-3,2e-3,5e-3`), or stop each run "
                        "at the level (`--set unlearn.stop_at=forget_prob<=reference`).", ""]
    settings = reporting.setting_columns(runs)
    levels: list[tuple[Level, pd.Series | None]] = []
    own_levels = reporting.reference_levels(results, runs, "forget_prob")
    if own_levels.notna().any():
        distinct = sorted(own_levels.dropna().round(12).unique())
        source = ("the retain reference's forget probability" if len(distinct) == 1 else
                  f"each target's own retain reference, per benchmark/split: {len(distinct)} levels")
        levels.append((Level("forget_prob", float(np.mean(distinct)), below=True, source=source), own_levels))
    else:
        lines += ["No retain reference forget probability in these runs: the forget-probability table is not computed.", ""]
    levels.append((Level("forget_quality", fq_level, below=False,
                         source=f"KS p-value {fq_level:g}; the reference's own is 1 by definition"), None))
    plotted = []
    for level, values in levels:
        if level.metric not in runs.columns or runs[level.metric].notna().sum() == 0:
            lines += [f"Not computed for {level.metric}: no run reports {level.metric}: nothing to match on", ""]
            continue
        readings = matched_readings(runs, settings, level, level_values=values)
        try:
            table = summarize_readings(readings, level)
        except MatchedForgettingError as error:
            lines += [f"Not computed for {level.metric}: {error}", ""]
            continue
        table.to_csv(out / f"matched_{level.metric}.csv", index=False)
        readings.to_csv(out / f"matched_{level.metric}_readings.csv", index=False)
        lines += [f"### At matched {level.metric.replace('_', ' ')} (interpolated over the lr grid)", "",
                  matched_markdown(table, level), ""]
        compared = readings[readings["reached"].astype(bool) & (readings["lrs"] >= 2)]
        differences = paired_differences(compared)
        if not differences.empty:
            paired.append(differences.assign(where=f"interpolated at {level.metric}"))
        # The frontier draws each distinct level (one per target and data).
        plotted += [level] if values is None else [
            Level(level.metric, float(value), level.below, level.source) for value in sorted(values.dropna().unique())[:12]]
    plots["frontier"] = reporting.plot_frontier(runs, out / "frontier.png", curve_columns(runs, settings), plotted,
                                                points)
    return lines


def _knockout_section(results: Path, runs: pd.DataFrame, out: Path, plots: dict) -> list[str]:
    """The knockout summaries of the masked runs (one per distinct mask) and the plot of the latest."""
    tables = reporting.knockout_tables(results, runs)
    if tables.empty:
        return []
    tables.to_csv(out / "knockout.csv", index=False)
    lines = ["## Knockout check of the masks (target, nothing trained)", "",
             "Drop of the mean answer log-probability (nats per answer token) when the set's activations are zeroed; "
             "random: mean ± std over draws; selectivity = forget drop / retain drop. One check per mask and target "
             "(each target has its own neurons).", "",
             "| " + " | ".join(["mask", "target", "set", "neurons", "forget drop", "retain drop", "selectivity",
                                "forget drop / random"]) + " |", "|---|---|---|---|---|---|---|---|"]
    for _, row in tables.iterrows():
        mask = ", ".join(f"{key.removeprefix('mask.')}={row[key]}" for key in row.index if key.startswith("mask."))
        target = ", ".join(f"{key.removeprefix('model.')}={reporting._setting(row[key])}" for key in row.index
                           if key.startswith(("model.", "data."))) or "-"
        lines.append(f"| {mask} | {target} | {row['kind']} | {int(row['neurons'])} | {row['forget_drop']:.4g} ± "
                     f"{row['forget_drop_std']:.2g} | {row['retain_drop']:.4g} ± {row['retain_drop_std']:.2g} | "
                     f"{row['selectivity']:.3g} | {row['forget_drop_over_random']:.3g} |")
    latest = runs[runs["run_id"] == tables["run_id"].iloc[-1]].iloc[0]
    run_dir = results / "runs" / str(latest["run_id"])
    curve_path = run_dir / "knockout_curve.parquet"
    curve = pd.read_parquet(curve_path) if curve_path.exists() else None
    summary = pd.read_parquet(run_dir / "knockout_summary.parquet")
    plots["knockout"] = reporting.plot_knockout(summary, curve, out / "knockout.png",
                                                title=f"Knockout (t={latest['config.mask.threshold']})")
    return lines + [""]


def _relearning_section(results: Path, runs: pd.DataFrame, out: Path, plots: dict) -> list[str]:
    """Recovery after the relearning attack per setting (mean ± std over seeds) and the curves;
    nothing when no run attacked."""
    table = reporting.relearn_table(runs)
    if table.empty:
        return []
    table.to_csv(out / "relearning.csv", index=False)
    curves = reporting.relearn_curves(results, reporting.relearned_runs(runs))
    if not curves.empty:
        plots["relearning"] = reporting.plot_relearning(curves, out / "relearning.png")
    return ["## Relearning attack", "",
            "A few fine-tuning steps on half of the forget items (or on retain items: `relearn.data=retain_only`; one "
            "epoch over every forget item: `forget_epoch`, on MUSE and WMDP over the forget windows), the other half "
            "measured (MUSE and WMDP: the evaluation's items). recovery = the unlearned model's forget probability "
            "(VerbMem on MUSE) after the attack / the retain "
            "reference's (1 = relearns like a model that never saw the data; > 1 = hidden, not removed; NaN without a "
            "retain reference, WMDP); regained = "
            "share of what unlearning removed that came back. Mean ± std over seeds.", "",
            reporting.table_markdown(table), ""]


def _robustness_section(runs: pd.DataFrame, out: Path, plots: dict, tolerance: float) -> list[str]:
    """Methods x attacks: recovery per attack (mean ± std over targets x seeds), OpenUnlearning's R, Q
    and HM, paired differences of recovery between methods, and the plot; nothing when no run attacked.
    Runs that stopped at a level are read where they matched it, at each method's best lr (the
    readings of the stopped tables); a fixed-budget sweep is read per setting."""
    from simu_core.matched import (UTILITY_METRICS, best_lrs, paired_differences, paired_markdown, stopped_readings,
                                   stopped_table)

    columns = reporting.attack_metric_columns(runs)
    if not columns:
        return []
    attacked = runs[runs[columns].notna().any(axis=1)]
    lines = ["## Attacks: removed or hidden?", ""]
    groups = []  # (heading, where: the heading's first part, the readings)
    # The attacks' own settings (relearn.data, attack.*) do not name a curve (they cannot change the
    # unlearned model) but change what the attack measures: each of their values is read on its own,
    # never averaged or paired with another.
    settings = reporting.setting_columns(runs)
    for attack_setting, setting_runs in reporting.attack_setting_groups(attacked):
        readings = stopped_readings(setting_runs, settings, tolerance, [*UTILITY_METRICS, *columns])
        if not readings.empty:
            for stop_at, rule_readings in readings.groupby("stop_at", sort=True):
                best = best_lrs(stopped_table(rule_readings))
                at_best = rule_readings.merge(best.dropna(subset=["lr"])[["curve", "lr"]], on=["curve", "lr"])
                where = f"stopped at {stop_at}" + (f", {attack_setting}" if attack_setting else "")
                groups.append((f"{where}, matched readings at each curve's best lr", where,
                               at_best[at_best["matched"].astype(bool)]))
        else:
            where = "fixed budget" + (f", {attack_setting}" if attack_setting else "")
            groups.append((f"{where}, per setting", where, reporting.attack_readings(setting_runs)))
    lines += ["Each attack ran on the unlearned model, its target and its retain reference, with the same settings "
              "and items. recovery = the unlearned model's forget probability (VerbMem on MUSE, accuracy on WMDP) "
              "after the attack / the retain "
              "reference's after the same attack (1 = like a model that never saw the forget items; > 1 = the attack "
              "brings back more than it gives a model that never learned them: hidden, not removed). Runs without a "
              "retain reference (WMDP) show regained instead: the share of what unlearning removed from the target "
              "that the attack brings back. R, Q and HM(R, Q): "
              "the OpenUnlearning meta-evaluation's robustness to relearning and to quantization on the same measure "
              "(1 = robust). Quantization's figures read the fewest bits; the logit lens its best layer.", ""]
    for heading, where, chosen in groups:
        chosen = chosen[[column for column in chosen.columns if column not in UTILITY_METRICS]]
        if chosen.empty:
            lines += [f"### {heading}", "", "(no reading)", ""]
            continue
        table = reporting.robustness_table(chosen)
        slug = "".join(character if character.isalnum() else "_" for character in where)
        table.to_csv(out / f"robustness_{slug}.csv", index=False)
        plots[f"robustness_{slug}"] = reporting.plot_robustness(table, out / f"robustness_{slug}.png")
        lines += [f"### {heading}", "", reporting.robustness_markdown(table), ""]
        # Each attack's headline recovery (quantization's per-bit columns end in "bit_recovery").
        recovery = [column for column in chosen.columns if column.startswith("metric.attack_")
                    and column.endswith("_recovery") and not column.endswith("bit_recovery")]
        names = {column: column.removeprefix("metric.attack_") for column in recovery}
        differences = paired_differences(chosen.rename(columns=names), list(names.values()))
        if not differences.empty:
            lines += ["Paired differences of recovery (same target, seed and data; A − B, mean ± std over the pairs; "
                      "quantization at the fewest bits):", "",
                      paired_markdown(differences.assign(where=where), list(names.values())), ""]
    return lines


def _requests_section(results: Path, rows: pd.DataFrame, out: Path, plots: dict) -> list[str]:
    """Sequential deletion requests: per setting (method, ...) and request, mean ± std of model
    utility, forget quality, forget probability and retain probability (with the stop outcome of
    stopped runs), each request's own items' forget probability after every later request, and the
    plot against the number of requests; nothing when no run had ``data.requests``."""
    if rows.empty:
        return []
    table = reporting.request_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "requests.csv", index=False)
    plots["requests"] = reporting.plot_requests(rows, out / "requests.png")
    spread = "targets x seeds (columns targets, seeds, readings)" if "readings" in table.columns else "seeds"
    lines = ["## Sequential deletion requests", "",
             "Request i unlearns its items from the model request i-1 produced; forget measures on every request so "
             f"far, against the retain reference; retain probability on the retain split. Mean ± std over {spread}."
             + (" `matched`: readings whose request stopped at the level within the tolerance (its own items, "
                "`unlearn.stop_at`)." if "matched" in table.columns else ""), "",
             reporting.table_markdown(table), ""]
    paired = reporting.request_paired(rows)
    if not paired.empty:
        from simu_core.matched import paired_markdown

        paired.to_csv(out / "request_paired.csv", index=False)
        metrics = ("model_utility", "retain_prob", "forget_prob")
        lines += ["Paired differences after each request (same target and seed; A − B, mean ± std over the pairs; "
                  "every reading, matched or not: the forget_prob difference says whether both forgot as much):", "",
                  paired_markdown(paired, metrics), ""]
    items = reporting.request_item_table(results, rows)
    if not items.empty:
        items.to_csv(out / "request_items.csv", index=False)
        lines += ["Forget probability of each request's own items after each request (mean over the readings):", "",
                  reporting.request_item_markdown(items), ""]
    return lines


def _requests_only_report(results: Path, out: Path, rows: pd.DataFrame) -> dict[str, Any]:
    """The report of a results folder that holds sequential deletion runs only."""
    plots: dict = {}
    count = rows["run_id"].nunique()
    lines = [f"# simu report ({count} sequential run{'s' if count != 1 else ''})", "", f"Results folder: `{results}`",
             "", *_requests_section(results, rows, out, plots)]
    lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"report": str(out / "report.md"), "plots": {k: str(v) for k, v in plots.items()}, "markdown": markdown,
            "table": reporting.request_table(rows)}
