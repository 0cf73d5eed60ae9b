"""Ablation sweeps and the comparison report: grid validation, restart without recomputation,
the Dask task runner, the report's table and plots."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from conftest import PROJECT_ROOT
from simu_core.config import ConfigError
from test_pipeline import PIPELINE_OVERRIDES


def _paths(root):
    return PIPELINE_OVERRIDES + [f"run.store={root / 'store'}", f"run.results={root / 'results'}"]


@pytest.mark.parametrize(
    "grid_args, message",
    [
        (["--grid", "mask.threshold=0.1,,0.3"], "empty value"),
        (["--grid", "mask.threshold="], "empty value"),
        (["--grid", "mask.colour=1,2"], "mask.colour: unknown key"),
        (["--grid", "mask.threshold=0.2,1.5"], "mask.threshold=1.5"),
        (["--grid", "unlearn.method=simu,magic"], "unlearn.method"),
        ([], "grid is empty"),
        (["--grid", "unlearn.lr=1e-3", "--targets", "0"], "--targets must be >= 1"),
        (["--grid", "model.finetune.seed=0,1", "--targets", "2"], "--targets sweeps model.finetune.seed"),
    ],
)
def test_bad_grids_fail_before_anything_runs(tmp_path, grid_args, message):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ablate", *grid_args, "--set", f"run.store={tmp_path / 'store'}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "store").exists()


def test_sweep_points_are_validated_and_seeded():
    from flows.grid import parse_grid_argument, sweep_points

    key, values = parse_grid_argument("mask.threshold=0.1,0.3")
    assert (key, values) == ("mask.threshold", [0.1, 0.3])
    points = sweep_points({key: values, "unlearn.method": ["simu", "so_graddiff"]}, 2, [], None)
    assert len(points) == 8
    assert points[0] == ["mask.threshold=0.1", "unlearn.method=simu", "run.seed=0"]
    with pytest.raises(ConfigError, match="--seeds"):
        sweep_points({key: values}, 0, [], None)


def test_targets_sweep_the_target_seed_like_seeds_sweep_the_run_seed():
    from flows.grid import sweep_points

    points = sweep_points({"unlearn.method": ["simu", "ga"]}, 2, [], None, targets=3)
    assert len(points) == 2 * 3 * 2
    assert points[:3] == [["unlearn.method=simu", "model.finetune.seed=0", "run.seed=0"],
                          ["unlearn.method=simu", "model.finetune.seed=0", "run.seed=1"],
                          ["unlearn.method=simu", "model.finetune.seed=1", "run.seed=0"]]
    assert sweep_points({"unlearn.method": ["simu"]}, 1, [], None) == [["unlearn.method=simu", "run.seed=0"]]
    with pytest.raises(ConfigError, match="--targets must be >= 1"):
        sweep_points({"unlearn.method": ["simu"]}, 1, [], None, targets=0)
    with pytest.raises(ConfigError, match="grid sweeps it too"):
        sweep_points({"model.finetune.seed": [0, 1]}, 1, [], None, targets=2)
    with pytest.raises(ConfigError, match="drop --set model.finetune.seed"):
        sweep_points({"unlearn.method": ["simu"]}, 1, ["model.finetune.seed=4"], None, targets=2)
    with pytest.raises(ConfigError, match="the target is given, not trained"):
        sweep_points({"unlearn.method": ["simu"]}, 1, ["model.target=some/model", "model.retain_reference=other/model"],
                     None, targets=2)


def test_interrupted_sweep_restarts_without_recomputing_finished_points(prefect_api, tmp_path, monkeypatch):
    from flows.ablation import simu_ablation
    from simu_core import stages

    original_unlearn = stages.unlearn
    calls = []
    crash = {"on": True}

    def failing_unlearn(config, *args, **kwargs):
        calls.append(config.mask.threshold)
        if crash["on"] and config.mask.threshold == 0.4:
            raise RuntimeError("simulated crash of the second point")
        return original_unlearn(config, *args, **kwargs)

    monkeypatch.setattr(stages, "unlearn", failing_unlearn)
    grid = {"mask.threshold": [0.2, 0.4]}
    with pytest.raises(Exception, match="simulated crash"):
        simu_ablation(grid=grid, seeds=1, overrides=_paths(tmp_path), max_parallel=1)
    assert calls == [0.2, 0.4]

    calls.clear()
    crash["on"] = False
    outcome = simu_ablation(grid=grid, seeds=1, overrides=_paths(tmp_path), max_parallel=1)
    assert calls == [0.4]  # the finished point came entirely from cache
    first_point_states = outcome["runs"][0]["states"]
    assert set(first_point_states.values()) == {"Cached"}
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert sorted(runs[runs["status"] == "completed"]["config.mask.threshold"].unique()) == [0.2, 0.4]
    report = outcome["report"]
    for name in ("tradeoff", "metrics_vs_threshold", "neuron_counts"):
        assert name in report["plots"]
    assert "| mask.threshold |" in report["markdown"]
    assert "| retain reference |" in report["markdown"] and "| target |" in report["markdown"]


def test_sweep_on_a_local_dask_cluster(prefect_api, tmp_path):
    from distributed import LocalCluster

    from flows.ablation import simu_ablation

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        outcome = simu_ablation(grid={"unlearn.method": ["so_graddiff", "fo_graddiff"]}, seeds=1,
                                overrides=_paths(tmp_path), dask_address=cluster.scheduler_address)
    assert len(outcome["runs"]) == 2
    states = outcome["runs"][1]["states"]
    assert states["train_target"] == "Cached" and states["unlearn"] == "Completed"


def test_report_table_and_plots(tmp_path):
    from flows.report import write_report

    rows = []
    for method, utility, quality in (("simu", 0.6, 0.3), ("so_graddiff", 0.5, 0.35)):
        for seed in range(3):
            rows.append({"run_id": f"{method}{seed}", "time": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=seed),
                         "status": "completed", "config_hash": f"{method}{seed}", "config.unlearn.method": method,
                         "config.run.seed": seed, "config.mask.threshold": 0.2, "forget_quality": quality + 0.01 * seed,
                         "model_utility": utility + 0.01 * seed, "forget_rouge": 0.4})
    (tmp_path / "results").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "results" / "runs.parquet")
    written = write_report(tmp_path / "results")
    table = written["table"]
    simu = table[table["unlearn.method"] == "simu"].iloc[0]
    assert simu["seeds"] == 3
    assert simu["model_utility_mean"] == pytest.approx(0.61)
    assert simu["model_utility_std"] == pytest.approx(0.01)
    assert "0.610 ± 0.010" in written["markdown"]
    assert (tmp_path / "results" / "report" / "tradeoff.png").stat().st_size > 10_000


def test_report_with_a_lightly_evaluated_retain_reference(tmp_path):
    """The retain reference's light evaluation has no model utility: its table cell is '-' and the
    trade-off plot has no point for it, never a made-up one (issue 11, defect 12)."""
    from flows.report import write_report

    results = tmp_path / "results"
    rows = []
    for seed in range(2):
        run_id = f"simu{seed}"
        rows.append({"run_id": run_id, "time": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=seed),
                     "status": "completed", "config_hash": run_id, "config.unlearn.method": "simu",
                     "config.run.seed": seed, "config.mask.threshold": 0.2, "config.unlearn.lr": 3e-4,
                     "forget_quality": 0.3, "model_utility": 0.6, "forget_rouge": 0.4, "forget_prob": 0.2,
                     "retain_prob": 0.8})
        metrics = [("target", "model_utility", 0.7), ("target", "forget_quality", 1e-5),
                   ("reference", "forget_truth_ratio", 0.6), ("reference", "model_utility_computed", 0.0)]
        (results / "runs" / run_id).mkdir(parents=True)
        pd.DataFrame([{"benchmark": "synthetic", "split": "all", "metric": metric, "value": value, "model": model}
                      for model, metric, value in metrics]).to_parquet(results / "runs" / run_id / "metrics.parquet")
    pd.DataFrame(rows).to_parquet(results / "runs.parquet")
    written = write_report(results)
    reference_row = next(line for line in written["markdown"].splitlines() if line.startswith("| retain reference |"))
    assert "0.700" not in reference_row and "| - |" in reference_row
    assert (results / "report" / "tradeoff.png").stat().st_size > 10_000
