"""The comparison report as a flow: table (Markdown), plots (PNG), linked from Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from simu_core import reporting


def write_report(results: str | Path, out_dir: str | Path | None = None, fq_level: float = 0.05) -> dict[str, Any]:
    """Read the runs table; write ``report.md`` and the plots; return their paths and the table.

    ``fq_level``: the forget-quality level of the matched-forgetting table (the retain
    reference's own forget quality is 1 by definition, so it cannot serve as the level).
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
    masked = runs[runs["config.unlearn.method"].isin(["simu", "simu_npo"])]
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
             "Mean ± std over seeds; one row per setting.", "", markdown_table, ""]
    if not points.empty:
        points.to_csv(out / "reference_points.csv", index=False)
        lines += ["Reference points: the target before unlearning and the retain reference (trained without the "
                  "forget set; forget quality 1.0 by definition), mean ± std over the same runs.", "",
                  reporting.table_markdown(points), ""]
    lines += _matched_forgetting_section(runs, points, out, plots, fq_level)
    lines += _knockout_section(results, runs, out, plots)
    lines += _relearning_section(results, runs, out, plots)
    lines += _requests_section(requests, out, plots)
    lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"report": str(out / "report.md"), "plots": {k: str(v) for k, v in plots.items()}, "markdown": markdown,
            "table": table}


@flow(name="simu-report", log_prints=True)
def simu_report(results: str = "results", out_dir: str | None = None, fq_level: float = 0.05) -> dict[str, Any]:
    """Write the comparison report and publish it (and links to the plots) as Prefect artifacts."""
    written = write_report(results, out_dir, fq_level)
    create_markdown_artifact(markdown=written["markdown"], key="simu-comparison", description="comparison table")
    create_link_artifact(link=Path(written["report"]).as_uri(), link_text="report.md", key="simu-report")
    for name, path in written["plots"].items():
        create_link_artifact(link=Path(path).as_uri(), link_text=Path(path).name, key=f"simu-plot-{name.replace('_', '-')}")
    print(written["markdown"])
    return {key: value for key, value in written.items() if key != "table"}


def _matched_forgetting_section(runs: pd.DataFrame, points: pd.DataFrame, out: Path, plots: dict,
                                fq_level: float) -> list[str]:
    """The matched-forgetting tables (forget probability at the retain reference's level, forget
    quality at ``fq_level``) and the frontier plot; a clear note instead when the runs cannot
    give them."""
    from simu_core.matched import (LR_COLUMN, Level, MatchedForgettingError, curve_columns, matched_forgetting,
                                   matched_markdown)

    lines = ["## Comparison at matched forgetting", ""]
    if LR_COLUMN not in runs.columns or runs[LR_COLUMN].nunique() < 2:
        return lines + ["Not computed: the runs hold fewer than 2 learning rates (sweep `unlearn.lr`, the same grid "
                        "for every method, e.g. `--grid unlearn.lr=1e-4,2e-4,5e-4,1e-3,2e-3,5e-3`).", ""]
    levels = []
    reference = points.set_index("model") if not points.empty else pd.DataFrame()
    if "retain reference" in reference.index and "forget_prob_mean" in reference.columns \
            and pd.notna(reference.loc["retain reference", "forget_prob_mean"]):
        levels.append(Level("forget_prob", float(reference.loc["retain reference", "forget_prob_mean"]), below=True,
                            source="the retain reference's forget probability"))
    else:
        lines += ["No retain reference forget probability in these runs: the forget-probability table is not computed.", ""]
    levels.append(Level("forget_quality", fq_level, below=False,
                        source=f"KS p-value {fq_level:g}; the reference's own is 1 by definition"))
    columns = curve_columns(runs, reporting.setting_columns(runs))
    for level in levels:
        try:
            table = matched_forgetting(runs, reporting.setting_columns(runs), level)
        except MatchedForgettingError as error:
            lines += [f"Not computed for {level.metric}: {error}", ""]
            continue
        table.to_csv(out / f"matched_{level.metric}.csv", index=False)
        lines += [f"### At matched {level.metric.replace('_', ' ')}", "", matched_markdown(table, level), ""]
    plots["frontier"] = reporting.plot_frontier(runs, out / "frontier.png", columns, levels, points)
    return lines


def _knockout_section(results: Path, runs: pd.DataFrame, out: Path, plots: dict) -> list[str]:
    """The knockout summaries of the masked runs (one per distinct mask) and the plot of the latest."""
    tables = reporting.knockout_tables(results, runs)
    if tables.empty:
        return []
    tables.to_csv(out / "knockout.csv", index=False)
    lines = ["## Knockout check of the masks (target, nothing trained)", "",
             "Drop of the mean answer log-probability (nats per answer token) when the set's activations are zeroed; "
             "random: mean ± std over draws; selectivity = forget drop / retain drop.", "",
             "| " + " | ".join(["mask", "set", "neurons", "forget drop", "retain drop", "selectivity",
                                "forget drop / random"]) + " |", "|---|---|---|---|---|---|---|"]
    for _, row in tables.iterrows():
        mask = ", ".join(f"{key.removeprefix('mask.')}={row[key]}" for key in row.index if key.startswith("mask."))
        lines.append(f"| {mask} | {row['kind']} | {int(row['neurons'])} | {row['forget_drop']:.4g} ± "
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
    curves = reporting.relearn_curves(results, runs[runs["metric.relearn_recovery"].notna()])
    if not curves.empty:
        plots["relearning"] = reporting.plot_relearning(curves, out / "relearning.png")
    return ["## Relearning attack", "",
            "A few fine-tuning steps on half of the forget items (or on retain items: `relearn.data=retain_only`), the "
            "other half measured. recovery = the unlearned model's forget probability after the attack / the retain "
            "reference's (1 = relearns like a model that never saw the data; > 1 = hidden, not removed); regained = "
            "share of what unlearning removed that came back. Mean ± std over seeds.", "",
            reporting.table_markdown(table), ""]


def _requests_section(rows: pd.DataFrame, out: Path, plots: dict) -> list[str]:
    """Sequential deletion requests: per setting (method, ...) and request, mean ± std over seeds of
    model utility, forget quality and forget probability, and the plot against the number of
    requests; nothing when no run had ``data.requests``."""
    if rows.empty:
        return []
    table = reporting.request_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "requests.csv", index=False)
    plots["requests"] = reporting.plot_requests(rows, out / "requests.png")
    return ["## Sequential deletion requests", "",
            "Request i unlearns its items from the model request i-1 produced; forget measures on every request so "
            "far, against the retain reference. Mean ± std over seeds.", "", reporting.table_markdown(table), ""]


def _requests_only_report(results: Path, out: Path, rows: pd.DataFrame) -> dict[str, Any]:
    """The report of a results folder that holds sequential deletion runs only."""
    plots: dict = {}
    count = rows["run_id"].nunique()
    lines = [f"# simu report ({count} sequential run{'s' if count != 1 else ''})", "", f"Results folder: `{results}`",
             "", *_requests_section(rows, out, plots)]
    lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"report": str(out / "report.md"), "plots": {k: str(v) for k, v in plots.items()}, "markdown": markdown,
            "table": reporting.request_table(rows)}
