"""The knockout stage and the random-neuron control in the Prefect pipeline, and the report's
matched-forgetting and knockout sections over real runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from test_pipeline import PIPELINE_OVERRIDES


@pytest.fixture(scope="module")
def knockout_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("knockout")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}",
            "knockout.random_draws=2", "knockout.curve_sizes=[1,4]", "knockout.curve_draws=1"], root


def run_flow(overrides):
    from flows.pipeline import simu_pipeline

    return simu_pipeline(overrides=PIPELINE_OVERRIDES + overrides)


def test_knockout_stage_writes_its_tables_is_cached_and_keyed_by_its_settings(prefect_api, knockout_workspace):
    paths, root = knockout_workspace
    first = run_flow(paths)
    assert first["states"]["knockout"] == "Completed"
    run_dir = Path(first["run_dir"])
    sets = pd.read_parquet(run_dir / "knockout.parquet")
    assert sets["kind"].tolist() == ["intact", "critical", "random", "random", "retain_critical"]
    summary = pd.read_parquet(run_dir / "knockout_summary.parquet").set_index("kind")
    critical = summary.loc["critical"]
    assert critical["neurons"] == summary.loc["random", "neurons"] == summary.loc["retain_critical", "neurons"] > 0
    assert critical["selectivity"] == pytest.approx(critical["forget_drop"] / critical["retain_drop"])
    curve = pd.read_parquet(run_dir / "knockout_curve.parquet")
    assert sorted(curve["k"].unique()) == [1, 4] and set(curve["kind"]) == {"top_forget_score", "random"}
    # Measured on held-out items only: none chose the critical set; as many forget as retain items.
    items = pd.read_parquet(run_dir / "knockout_items.parquet")
    for split in ("forget", "retain"):
        roles = items[items["split"] == split].groupby("role")["item_id"].apply(set)
        assert roles["measured"] and not roles["attributed"] & roles["measured"], split
    measured = items[items["role"] == "measured"]["split"].value_counts()
    assert measured["forget"] == measured["retain"] == 5  # the held-out half of the 10 forget items
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    assert runs["metric.knockout_critical_over_random"].iloc[-1] == pytest.approx(critical["forget_drop_over_random"])
    assert runs["metric.knockout_forget_items"].iloc[-1] == runs["metric.knockout_retain_items"].iloc[-1] == 5
    assert [row["kind"] for row in first["knockout"]] == ["critical", "random", "retain_critical"]

    again = run_flow(paths)
    assert again["states"]["knockout"] == "Cached"
    more_draws = run_flow(paths + ["knockout.random_draws=3"])
    assert more_draws["states"]["knockout"] == "Completed"
    for label in ("threshold_mask", "unlearn", "evaluate"):
        assert more_draws["states"][label] == "Cached", label
    # Turning the check off leaves the rest of the run as it was.
    off = run_flow(paths + ["knockout.enabled=false"])
    assert "knockout" not in off["states"] and off["states"]["unlearn"] == "Cached"


def test_random_rule_trains_random_neurons_at_the_same_per_layer_counts(prefect_api, knockout_workspace):
    paths, _ = knockout_workspace
    critical = run_flow(paths)
    control = run_flow(paths + ["mask.rule=random"])
    assert control["states"]["attribute_forget"] == "Cached"  # same attribution
    assert control["states"]["threshold_mask"] == "Completed" and control["states"]["unlearn"] == "Completed"
    # The knockout checks the critical neurons the random mask stands in for: one entry for both rules.
    assert control["states"]["knockout"] == "Cached"
    # The knockout compares the critical neurons the random mask stands in for: the same figures.
    critical_check = pd.read_parquet(Path(critical["run_dir"]) / "knockout_summary.parquet")
    control_check = pd.read_parquet(Path(control["run_dir"]) / "knockout_summary.parquet")
    pd.testing.assert_frame_equal(critical_check, control_check)
    paper = pd.read_parquet(Path(critical["run_dir"]) / "mask.parquet")
    random = pd.read_parquet(Path(control["run_dir"]) / "mask.parquet")
    assert (paper.groupby("layer")["in_mask"].sum() == random.groupby("layer")["in_mask"].sum()).all()
    assert not paper["in_mask"].equals(random["in_mask"])
    assert paper["critical_forget"].equals(random["critical_forget"])
    reseeded = run_flow(paths + ["mask.rule=random", "run.seed=1"])
    other = pd.read_parquet(Path(reseeded["run_dir"]) / "mask.parquet")
    assert not other["in_mask"].equals(random["in_mask"])  # run.seed draws the control
    # ... but not the knockout (knockout.seed splits its items and draws its random sets): shared by every seed.
    assert reseeded["states"]["knockout"] == "Cached" and reseeded["states"]["unlearn"] == "Completed"


def test_report_writes_matched_forgetting_frontier_and_knockout(prefect_api, knockout_workspace):
    from flows.report import write_report

    paths, root = knockout_workspace
    results = root / "results"
    lines = write_report(results)["markdown"]
    assert "Not computed: the runs hold fewer than 2 learning rates" in lines
    for lr in ("1e-3", "1e-2"):
        for method in ("simu", "so_graddiff"):
            run_flow(paths + [f"unlearn.lr={lr}", f"unlearn.method={method}"])
    written = write_report(results)
    assert "### At matched forget prob" in written["markdown"]
    assert "### At matched forget quality" in written["markdown"]
    assert "## Knockout check of the masks" in written["markdown"]
    for name in ("frontier", "knockout"):
        assert Path(written["plots"][name]).stat().st_size > 0
    table = pd.read_csv(results / "report" / "matched_forget_prob.csv")
    assert {"curve", "seeds_reached", "model_utility_mean", "note"} <= set(table.columns)
