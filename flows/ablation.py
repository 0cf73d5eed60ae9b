"""Ablation sweeps: every point of a grid (times seeds) through the pipeline flow.

Shared upstream stages are computed once: the first point runs alone and fills the store, the
others then find those stages cached (and per-stage file locks keep concurrent points on one host
from computing the same entry twice). Points run a bounded number at a time in threads, or on a
Dask cluster through ``prefect-dask`` when an address is given.
"""

from __future__ import annotations

import itertools
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import simu_pipeline
from flows.report import simu_report
from simu_core.config import ConfigError, load_config, parse_override


def parse_grid_argument(argument: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` into (key, values), each value read as YAML; empty values are errors."""
    if "=" not in argument:
        raise ConfigError(f"grid {argument!r} must look like section.key=v1,v2,...")
    key, raw = argument.split("=", 1)
    pieces = raw.split(",")
    if not raw.strip() or any(not piece.strip() for piece in pieces):
        raise ConfigError(f"grid {key!r} has an empty value in {raw!r}")
    values = [parse_override(f"{key}={piece.strip()}")[1] for piece in pieces]
    return key.strip(), values


def _yaml_value(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value


def sweep_points(grid: dict[str, list[Any]], seeds: int, overrides: list[str], config_path: str | None) -> list[list[str]]:
    """Every grid point (x seeds) as an override list, each validated before anything runs."""
    if not grid:
        raise ConfigError("the grid is empty: give at least one --grid key=v1,v2")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"grid {key!r} has no values")
    seed_values = [None] if "run.seed" in grid else list(range(seeds))
    points = []
    for combination in itertools.product(*grid.values()):
        for seed in seed_values:
            point = overrides + [f"{key}={_yaml_value(value)}" for key, value in zip(grid, combination)]
            if seed is not None:
                point.append(f"run.seed={seed}")
            try:
                load_config(config_path, point)
            except ConfigError as error:
                setting = ", ".join(f"{key}={value}" for key, value in zip(grid, combination))
                raise ConfigError(f"grid point ({setting}): {error}") from None
            points.append(point)
    return points


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
