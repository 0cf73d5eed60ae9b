"""Ablation sweeps: every point of a grid (times seeds) through the pipeline flow.

Shared upstream stages are computed once: the first point runs alone and fills the store, the
others then find those stages cached (and per-stage file locks keep concurrent points on one host
from computing the same entry twice). Points run a bounded number at a time in threads, or on a
Dask cluster through ``prefect-dask`` when an address is given.

Points running at once in threads share the cores: each sets its own torch thread count (torch's
is per thread) to the process's torch threads divided by ``max_parallel``; the first point,
alone, gets them all (``simu`` sets that budget from the free cores: ``simu_core.threads``). With
every point on every core, torch processes sharing 2 cores ran 10-60x slower than their fair share
(issue 11).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import simu_pipeline
from flows.report import simu_report
from flows.grid import sweep_points
from simu_core.config import load_config
from simu_core.threads import set_torch_threads


@task(name="ablation_point", cache_policy=NO_CACHE)
def run_point(overrides: list[str], config_path: str | None, threads: int | None = None) -> dict[str, Any]:
    """One grid point: the whole pipeline as a nested flow run, on ``threads`` torch threads (None: as is)."""
    previous = torch.get_num_threads()
    if threads is not None:
        # In this worker thread: the nested flow's tasks run in it, other points keep theirs.
        set_torch_threads(threads)
    try:
        summary = simu_pipeline(overrides=overrides, config_path=config_path)
    finally:
        set_torch_threads(previous)
    return {key: summary[key] for key in ("run_id", "metrics", "states", "run_dir")}


@flow(name="simu-sweep-points")
def _run_points(points: list[list[str]], config_path: str | None, threads: int | None = None) -> list[dict[str, Any]]:
    futures = [run_point.submit(point, config_path, threads) for point in points]
    return [future.result() for future in futures]


@flow(name="simu-ablation", log_prints=True)
def simu_ablation(
    grid: dict[str, list[Any]],
    seeds: int = 1,
    overrides: list[str] | None = None,
    config_path: str | None = None,
    max_parallel: int = 2,
    dask_address: str | None = None,
    threads: int | None = None,
    first_threads: int | None = None,
    targets: int | None = None,
) -> dict[str, Any]:
    """Run a grid of settings (x ``targets`` x ``seeds``) through the pipeline and write the
    comparison report. ``targets``: N targets, ``model.finetune.seed`` = 0..N-1 (None: as configured).

    ``threads``: torch threads per point running in parallel (default: the caller's torch thread
    count divided by the points at once, which are ``max_parallel`` but never more than that
    count; on Dask, the workers' own setting). ``first_threads``: those of the first point, which
    runs alone (default: the caller's count).
    """
    for name, value in (("max_parallel", max_parallel), ("threads", threads), ("first_threads", first_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    points = sweep_points(grid, seeds, list(overrides or []), config_path, targets)
    budget = torch.get_num_threads()  # the process's (``simu`` sets it from the free cores)
    first_threads = first_threads or budget
    parallel = max_parallel
    if threads is None and not dask_address:
        # More points at once than threads to give them only adds contention (and, in one process,
        # waits on the GIL): with one free core, points run one after another.
        parallel = min(max_parallel, budget)
        threads = max(1, budget // parallel)
    replicates = (seeds if "run.seed" not in grid else 1) * (targets or 1)
    print(f"sweep: {len(points)} runs ({len(points) // max(1, replicates)} settings"
          + (f", {targets} targets" if targets else "") + ")")
    # The first point alone computes the stages every point shares.
    print(f"torch threads: {first_threads} for the first point, "
          + (f"{threads} per point for the others ({parallel} at a time)" if threads else "the workers' own after it"))
    summaries = [run_point(points[0], config_path, first_threads)]
    if len(points) > 1:
        if dask_address:
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(address=dask_address)
        else:
            runner = ThreadPoolTaskRunner(max_workers=parallel)
        summaries += _run_points.with_options(task_runner=runner)(points[1:], config_path, threads)
    results = load_config(config_path, points[0]).run.results
    report = simu_report(results)
    return {"runs": summaries, "report": report}
