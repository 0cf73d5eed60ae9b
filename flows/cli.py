"""The ``simu`` command line: ``simu run`` (one pipeline run), ``simu ablate``, ``simu eval`` (evaluate a
model, no unlearning), ``simu report`` and ``simu plan`` (memory per stage and device)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flows import lifecycle
from simu_core.config import ConfigError, check_pipeline_models, load_config
from simu_core.preflight import PreflightError, check_inputs


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in data/configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set mask.threshold=0.3 (repeatable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads for this command, shared by the points a sweep runs at once "
                        "(default: OMP_NUM_THREADS, else the cores other processes leave free)")


def _configure_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (or a load-aware default) before torch is imported (simu_core.threads)."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        raise SystemExit(2)
    if hasattr(args, "threads"):
        from simu_core.threads import configure_threads

        configure_threads(args.threads)


def _format(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


RUN_COLUMNS = (("target", "target_metrics"), ("unlearned", "metrics"), ("retain reference", "reference_metrics"))
EVAL_COLUMNS = (("model", "metrics"), ("reference", "reference_metrics"))
# Sequential deletion requests: the model after the last request, on every request's items.
REQUEST_COLUMNS = (("after the last request", "metrics"), ("retain reference", "reference_metrics"))


def _print_rows(rows: Sequence[Sequence[str]]) -> None:
    """Print a table: columns padded, a rule under the header row."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_run_summary(summary: dict, columns: Sequence[tuple[str, str]] = RUN_COLUMNS) -> None:
    """Print dataset sizes, training figures, the metrics table (and, for sequential deletion
    requests, the curve over the requests) and where the results are."""
    if summary.get("requests") and columns == RUN_COLUMNS:
        columns = REQUEST_COLUMNS
    sizes = summary.get("dataset_sizes") or {}
    if sizes:
        print("dataset sizes: " + ", ".join(f"{name}={count}" for name, count in sizes.items()))
    for name, stats in (summary.get("training") or {}).items():
        if stats:
            print(f"trained {name}: {stats.get('examples')} examples, {stats.get('wall_seconds', 0):.1f} s, "
                  f"{stats.get('tokens_per_second', 0):.0f} tokens/s")
    rows = [("metric", *(title for title, _ in columns))]
    sources = [summary.get(key) or {} for _, key in columns]
    from simu_core.benchmarks.info import BENCHMARK_INFO

    for name in BENCHMARK_INFO[summary.get("benchmark") or "synthetic"].summary:
        if any(name in source for source in sources):
            rows.append((name, *(_format(source.get(name)) for source in sources)))
    _print_rows(rows)
    if (summary.get("reference_metrics") or {}).get("model_utility_computed") == 0.0:
        # Say why the reference's column has gaps: not computed, not missing.
        print("retain reference: light evaluation, only what forget quality and privleak compare "
              "(--set eval.reference_full=true evaluates it fully)")
    if "stop_status" in (summary.get("unlearning") or {}):
        from simu_core.stopping import format_outcome

        print(format_outcome(summary["unlearning"]))
    if summary.get("requests"):
        print("deletion requests (each from the model the one before produced; forget measures on every request "
              "so far):")
        _print_rows([("request", "items so far", "forget_quality", "model_utility", "forget_prob"),
                     *((str(point["request"]), str(point["items"]),
                        *(_format(point.get(name)) for name in ("forget_quality", "model_utility", "forget_prob")))
                       for point in summary["requests"])])
    if summary.get("knockout"):
        import pandas as pd

        from simu_core.knockout import format_summary

        print("\n".join(format_summary(pd.DataFrame(summary["knockout"]))))
    if summary.get("relearn"):
        from simu_core.attacks.relearn import format_recovery

        print("\n".join(format_recovery(summary["relearn"])))
    if summary.get("robustness"):
        import pandas as pd

        from simu_core.attacks.robustness import format_robustness

        print("attacks (the unlearned model, the target and the retain reference; robustness.parquet has every "
              "measure and setting):")
        print("\n".join(format_robustness(pd.DataFrame(summary["robustness"]))))
    stages = summary.get("states") or {}
    print("stages: " + ", ".join(f"{label}={state}" for label, state in stages.items()))
    print(f"results: {summary.get('run_dir')}  (runs table: {os.path.join(summary.get('results', ''), 'runs.parquet')})")


def command_run(args: argparse.Namespace) -> int:
    """Validate the config, then run the pipeline flow once."""
    try:
        config = load_config(args.config, args.overrides)
        check_pipeline_models(config)
        check_inputs(config)
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lifecycle.start_temporary_server()
    from flows.pipeline import simu_pipeline  # imported late: Prefect start-up is slow

    try:
        summary = simu_pipeline(overrides=args.overrides, config_path=args.config)
    except ConfigError as error:  # found once the data is prepared (data.requests vs the forget split)
        print(f"error: {error}", file=sys.stderr)
        return 2
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
        points = sweep_points(grid, args.seeds, args.overrides, args.config, args.targets)
        for point in points:
            config = load_config(args.config, point)
            check_pipeline_models(config)
            check_inputs(config)
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep of {len(points)} runs")
    lifecycle.start_temporary_server()
    from flows.ablation import simu_ablation

    outcome = simu_ablation(grid=grid, seeds=args.seeds, overrides=args.overrides, config_path=args.config,
                            max_parallel=args.max_parallel, dask_address=args.dask_address, targets=args.targets)
    print(f"report: {outcome['report']['report']}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    """Validate, then evaluate the model (and the reference) on the configured benchmark."""
    from flows.eval_inputs import check_model_folders, eval_config

    try:
        config = eval_config(args.model, args.reference, args.overrides, args.config)
        check_model_folders(config)
        check_inputs(config)
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lifecycle.start_temporary_server()
    from flows.evaluate import simu_eval

    summary = simu_eval(model=args.model, reference=args.reference, overrides=args.overrides,
                        config_path=args.config)
    print_run_summary(summary, EVAL_COLUMNS)
    return 0


def _probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _tolerance(text: str) -> float:
    """argparse type: a relative tolerance in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def command_report(args: argparse.Namespace) -> int:
    """Write the comparison report of a results folder."""
    from flows.report import write_report

    try:
        written = write_report(args.results, args.out, fq_level=args.fq_level, tolerance=args.tolerance,
                               best_by=args.best_by)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"])
    print(f"report: {written['report']}")
    for name, path in written["plots"].items():
        print(f"plot {name}: {path}")
    return 0


def _device_counts(text: str) -> list[int]:
    """argparse type: comma-separated device counts, each >= 1."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected device counts like 1,2,4,8, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"device counts must be >= 1, got {text!r}")
    return counts


def command_plan(args: argparse.Namespace) -> int:
    """Print the memory each stage needs per device (no stage runs, no weights are loaded)."""
    from simu_core.planning import PlanError, device_memory, format_plan, plan_memory, read_plan_mask

    try:
        config = load_config(args.config, args.overrides)
        check_inputs(config)
        memory, source = device_memory(config.run.device, args.device_memory)
        mask = read_plan_mask(args.mask) if args.mask else None
        plan = plan_memory(config, device_memory=memory, device_counts=args.devices, mask=mask,
                           mask_fraction=args.mask_fraction, device_memory_source=source)
    except (ConfigError, PreflightError, PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json:
        import json

        with open(args.json, "w") as handle:
            json.dump(plan.to_json(), handle, indent=2)
        print(f"plan: {args.json}")
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
    ablate.add_argument("--targets", type=int, default=None, metavar="N",
                        help="targets per setting: model.finetune.seed = 0..N-1, each target trained with its own "
                        "retain reference (default: the configured one)")
    ablate.add_argument("--max-parallel", type=int, default=2, help="points run at once on this machine")
    ablate.add_argument("--dask-address", default=None, help="run points on this Dask scheduler (prefect-dask)")
    ablate.set_defaults(handler=command_ablate)
    evaluate = commands.add_parser("eval", help="evaluate a model folder or hub id on the benchmark (no unlearning)")
    evaluate.add_argument("--model", required=True, help="model to evaluate: a Hugging Face folder or hub id")
    evaluate.add_argument("--reference", default=None,
                          help="retain model (folder or hub id) for forget quality and privleak (default: none)")
    _add_config_arguments(evaluate)
    evaluate.set_defaults(handler=command_eval)
    report = commands.add_parser("report", help="comparison table and plots from a results folder")
    report.add_argument("--results", default="results", help="results folder holding runs.parquet")
    report.add_argument("--out", default=None, help="output folder (default: <results>/report)")
    report.add_argument("--fq-level", type=_probability, default=0.05,
                        help="forget-quality level of the matched-forgetting table (a KS p-value; default 0.05)")
    report.add_argument("--tolerance", type=_tolerance, default=0.1,
                        help="runs stopped at a level (unlearn.stop_at) count as matched within this relative "
                        "distance of their level (default 0.1)")
    report.add_argument("--best-by", default=None, metavar="UTILITY",
                        help="the utility whose mean picks each method's best lr among stopped runs (default: the "
                        "benchmark's first, e.g. model_utility; retain_prob where model utility sits at its floor)")
    report.set_defaults(handler=command_report)
    plan = commands.add_parser("plan", help="memory per stage and device from the model's config.json (nothing runs)")
    _add_config_arguments(plan)
    plan.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                      help="memory of one device in GiB (default: the GPU's here, else 80)")
    plan.add_argument("--devices", type=_device_counts, default=[1, 2, 4, 8], metavar="N,N,...",
                      help="device counts planned for FSDP unlearning (default 1,2,4,8; run.devices is added)")
    plan.add_argument("--mask", default=None, metavar="PATH",
                      help="a mask.parquet (or a folder holding one, e.g. a run folder) to plan SIMU with")
    plan.add_argument("--mask-fraction", type=_probability, default=0.05,
                      help="without --mask: the fraction of each layer's neurons SIMU trains (default 0.05)")
    plan.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON (bytes)")
    plan.set_defaults(handler=command_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``simu`` console script.

    SIGTERM stops a command like Ctrl-C: the run is recorded as ``interrupted`` and the process
    exits within seconds (exit status 128 + the signal's number), its temporary server stopped.
    """
    args = build_parser().parse_args(argv)
    _configure_threads(args)
    if args.handler in (command_report, command_plan):
        return args.handler(args)
    lifecycle.configure_environment()  # before Prefect is imported
    lifecycle.install_signal_handlers()
    exit_code = 1
    try:
        exit_code = args.handler(args)
    except lifecycle.Interrupted as stop:
        exit_code = 128 + stop.signum
        print(f"\nsimu {args.command}: {stop}; stopped (an unfinished run is recorded as 'interrupted')",
              file=sys.stderr)
    finally:
        lifecycle.shutdown(exit_code)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
