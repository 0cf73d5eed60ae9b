"""The ``simu`` command line: ``simu run`` (one pipeline run), ``simu ablate`` and ``simu report``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from simu_core.config import ConfigError, load_config
from simu_core.preflight import PreflightError, check_inputs


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in data/configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set mask.threshold=0.3 (repeatable)")


def _format(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_run_summary(summary: dict) -> None:
    """Print dataset sizes, training figures, the metrics table and where the results are."""
    sizes = summary.get("dataset_sizes") or {}
    if sizes:
        print("dataset sizes: " + ", ".join(f"{name}={count}" for name, count in sizes.items()))
    for name, stats in (summary.get("training") or {}).items():
        if stats:
            print(f"trained {name}: {stats.get('examples')} examples, {stats.get('wall_seconds', 0):.1f} s, "
                  f"{stats.get('tokens_per_second', 0):.0f} tokens/s")
    rows = [("metric", "target", "unlearned", "retain reference")]
    metrics = summary.get("metrics") or {}
    target = summary.get("target_metrics") or {}
    reference = summary.get("reference_metrics") or {}
    for name in ("forget_prob", "retain_prob", "forget_rouge", "retain_rouge", "forget_truth_ratio",
                 "forget_quality", "model_utility", "privleak"):
        if any(name in source for source in (metrics, target, reference)):
            rows.append((name, _format(target.get(name)), _format(metrics.get(name)), _format(reference.get(name))))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    stages = summary.get("states") or {}
    print("stages: " + ", ".join(f"{label}={state}" for label, state in stages.items()))
    print(f"results: {summary.get('run_dir')}  (runs table: {os.path.join(summary.get('results', ''), 'runs.parquet')})")


def command_run(args: argparse.Namespace) -> int:
    """Validate the config, then run the pipeline flow once."""
    try:
        check_inputs(load_config(args.config, args.overrides))
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from flows.pipeline import simu_pipeline  # imported late: Prefect start-up is slow

    summary = simu_pipeline(overrides=args.overrides, config_path=args.config)
    print_run_summary(summary)
    return 0


def command_ablate(args: argparse.Namespace) -> int:
    """Validate every grid point, then run the sweep flow."""
    from flows.grid import parse_grid_argument, sweep_points

    try:
        grid: dict = {}
        for argument in args.grid:
            key, values = parse_grid_argument(argument)
            if key in grid:
                raise ConfigError(f"grid key {key!r} given twice")
            grid[key] = values
        points = sweep_points(grid, args.seeds, args.overrides, args.config)
        for point in points:
            check_inputs(load_config(args.config, point))
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep of {len(points)} runs")
    from flows.ablation import simu_ablation

    outcome = simu_ablation(grid=grid, seeds=args.seeds, overrides=args.overrides, config_path=args.config,
                            max_parallel=args.max_parallel, dask_address=args.dask_address)
    print(f"report: {outcome['report']['report']}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    """Write the comparison report of a results folder."""
    from flows.report import write_report

    try:
        written = write_report(args.results, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"])
    print(f"report: {written['report']}")
    for name, path in written["plots"].items():
        print(f"plot {name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``simu``."""
    parser = argparse.ArgumentParser(prog="simu", description="SIMU unlearning pipeline (Prefect, cached stages)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline once (default: built-in synthetic benchmark on CPU)")
    _add_config_arguments(run)
    run.set_defaults(handler=command_run)
    ablate = commands.add_parser("ablate", help="run a grid of settings (x seeds) through the pipeline")
    _add_config_arguments(ablate)
    ablate.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeatable; the sweep is their product)")
    ablate.add_argument("--seeds", type=int, default=1, help="seeds per setting (run.seed = 0..N-1)")
    ablate.add_argument("--max-parallel", type=int, default=2, help="points run at once on this machine")
    ablate.add_argument("--dask-address", default=None, help="run points on this Dask scheduler (prefect-dask)")
    ablate.set_defaults(handler=command_ablate)
    report = commands.add_parser("report", help="comparison table and plots from a results folder")
    report.add_argument("--results", default="results", help="results folder holding runs.parquet")
    report.add_argument("--out", default=None, help="output folder (default: <results>/report)")
    report.set_defaults(handler=command_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``simu`` console script."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
