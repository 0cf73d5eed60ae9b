"""Ablation sweeps: every point of a grid (times seeds) through the pipeline flow.

Shared upstream stages are computed once: the first point runs alone and fills the store, the
others then find those stages cached (and per-stage file locks keep concurrent points on one host
from computing the same entry twice). Points run a bounded number at a time in threads, or on a
Dask cluster through ``prefect-dask`` when an address is given.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import simu_pipeline
from flows.report import simu_report
from flows.grid import sweep_points
from simu_core.config import load_config


@task(name="ablation_point", cache_policy=NO_CACHE)
def run_point(overrides: list[str], config_path: str | None) -> dict[str, Any]:
    """One grid point: the whole pipeline as a nested flow run."""
    summary = simu_pipeline(overrides=overrides, config_path=config_path)
    return {key: summary[key] for key in ("run_id", "metrics", "states", "run_dir")}


@flow(name="simu-sweep-points")
def _run_points(points: list[list[str]], config_path: str | None) -> list[dict[str, Any]]:
    futures = [run_point.submit(point, config_path) for point in points]
    return [future.result() for future in futures]


@flow(name="simu-ablation", log_prints=True)
def simu_ablation(
    grid: dict[str, list[Any]],
    seeds: int = 1,
    overrides: list[str] | None = None,
    config_path: str | None = None,
    max_parallel: int = 2,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Run a grid of settings through the pipeline and write the comparison report."""
    points = sweep_points(grid, seeds, list(overrides or []), config_path)
    print(f"sweep: {len(points)} runs ({len(points) // max(1, seeds if 'run.seed' not in grid else 1)} settings)")
    # The first point alone computes the stages every point shares.
    summaries = [run_point(points[0], config_path)]
    if len(points) > 1:
        if dask_address:
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(address=dask_address)
        else:
            runner = ThreadPoolTaskRunner(max_workers=max(1, max_parallel))
        summaries += _run_points.with_options(task_runner=runner)(points[1:], config_path)
    results = load_config(config_path, points[0]).run.results
    report = simu_report(results)
    return {"runs": summaries, "report": report}
