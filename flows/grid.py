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


TARGET_SEED = "model.finetune.seed"


def sweep_points(grid: dict[str, list[Any]], seeds: int, overrides: list[str], config_path: str | None,
                 targets: int | None = None) -> list[list[str]]:
    """Every grid point (x targets x seeds) as an override list, each validated before anything
    runs. ``targets``: train N targets (``model.finetune.seed`` = 0..N-1, each with its own retain
    reference), as ``seeds`` sweeps ``run.seed``; None leaves the target seed as configured."""
    if not grid:
        raise ConfigError("the grid is empty: give at least one --grid key=v1,v2")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if targets is not None:
        if targets < 1:
            raise ConfigError(f"--targets must be >= 1, got {targets}")
        if TARGET_SEED in grid:
            raise ConfigError(f"--targets sweeps {TARGET_SEED} (0..N-1) and the grid sweeps it too: give one of them")
        if any(override.split("=", 1)[0].strip() == TARGET_SEED for override in overrides):
            raise ConfigError(f"--targets sweeps {TARGET_SEED} (0..N-1): drop --set {TARGET_SEED}=...")
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"grid {key!r} has no values")
    seed_values = [None] if "run.seed" in grid else list(range(seeds))
    target_values = [None] if targets is None else list(range(targets))
    points = []
    for combination in itertools.product(*grid.values()):
        for target in target_values:
            for seed in seed_values:
                point = overrides + [f"{key}={_yaml_value(value)}" for key, value in zip(grid, combination)]
                if target is not None:
                    point.append(f"{TARGET_SEED}={target}")
                if seed is not None:
                    point.append(f"run.seed={seed}")
                try:
                    config = load_config(config_path, point)
                except ConfigError as error:
                    setting = ", ".join(f"{key}={value}" for key, value in zip(grid, combination))
                    raise ConfigError(f"grid point ({setting}): {error}") from None
                if target is not None and targets > 1 and config.model.target:
                    # A given target is not trained: every target seed would be the same model.
                    raise ConfigError(f"--targets {targets} with model.target={config.model.target!r}: the target "
                                      f"is given, not trained, so {TARGET_SEED} would not change it; leave "
                                      "model.target unset (fine-tune from model.base) or drop --targets")
                points.append(point)
    return points


