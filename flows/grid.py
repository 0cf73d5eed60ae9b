"""Sweep grids: ``--grid key=v1,v2`` parsing and the validated list of points (no Prefect import,
so that bad grids are rejected in a fraction of a second)."""

from __future__ import annotations

import itertools
import json
from typing import Any

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


