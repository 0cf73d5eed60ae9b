"""The comparison report as a flow: table (Markdown), plots (PNG), linked from Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from simu_core import reporting


def write_report(results: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Read the runs table; write ``report.md`` and the plots; return their paths and the table."""
    results = Path(results).resolve()
    out = Path(out_dir).resolve() if out_dir else results / "report"
    runs = reporting.read_runs(results)
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
    lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"report": str(out / "report.md"), "plots": {k: str(v) for k, v in plots.items()}, "markdown": markdown,
            "table": table}


@flow(name="simu-report", log_prints=True)
def simu_report(results: str = "results", out_dir: str | None = None) -> dict[str, Any]:
    """Write the comparison report and publish it (and links to the plots) as Prefect artifacts."""
    written = write_report(results, out_dir)
    create_markdown_artifact(markdown=written["markdown"], key="simu-comparison", description="comparison table")
    create_link_artifact(link=Path(written["report"]).as_uri(), link_text="report.md", key="simu-report")
    for name, path in written["plots"].items():
        create_link_artifact(link=Path(path).as_uri(), link_text=Path(path).name, key=f"simu-plot-{name.replace('_', '-')}")
    print(written["markdown"])
    return {key: value for key, value in written.items() if key != "table"}
