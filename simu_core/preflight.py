"""Cheap checks of a config's inputs before any stage runs (missing folders and files, more devices
than the machine has, a model that cannot fit them)."""

from __future__ import annotations

from pathlib import Path

from simu_core.benchmarks.info import BENCHMARK_INFO
from simu_core.config import SimuConfig


class PreflightError(ValueError):
    """An input named by the config is missing; the message names the field and the path."""


def _looks_local(reference: str) -> bool:
    # Hub ids look like "org/name"; paths start with /, ., ~ or exist.
    return reference.startswith(("/", ".", "~")) or Path(reference).exists()


def check_inputs(config: SimuConfig) -> None:
    """Raise PreflightError when a local folder or file the run needs is missing."""
    problems = []
    if config.data.source is not None:
        from simu_core.benchmarks.loaders import benchmark_loader

        problems += benchmark_loader(config.data.benchmark).check_source(config.data)
    for field in ("base", "target", "retain_reference", "tokenizer"):
        reference = getattr(config.model, field)
        if reference and _looks_local(reference) and not Path(reference).expanduser().exists():
            problems.append(f"model.{field}: local path {reference!r} does not exist")
    if config.eval.mmlu_source and not Path(config.eval.mmlu_source).expanduser().exists():
        problems.append(f"eval.mmlu_source: {config.eval.mmlu_source!r} does not exist")
    if problems:
        raise PreflightError("; ".join(problems))
    _check_forget_set_uses(config)
    _check_devices_and_memory(config)


def _check_forget_set_uses(config: SimuConfig) -> None:
    """Deletion requests naming items the benchmark lacks, an attack with an empty part (relearning,
    in-context: k larger than the items it can show) and the paraphrase attack on a benchmark without
    paraphrased questions, refused here when the split sizes are cheap to know (the built-in benchmark is generated,
    a local TOFU folder read); a hub dataset is checked by the flow right after prepare_data."""
    info = BENCHMARK_INFO[config.data.benchmark]
    # Only the TOFU-style benchmarks split their forget items (requests, relearning's halves, in-context
    # shots); a corpus benchmark's attacks read all its windows and its evaluation's items.
    if not (config.data.requests or config.attacks) or info.item_kind != "qa":
        return
    if config.data.benchmark == "tofu" and config.data.source is None:
        return
    from simu_core.data import load_benchmark
    from simu_core.attacks.relearn import check_attack_sizes
    from simu_core.requests import expand_requests

    benchmark = load_benchmark(config.data)
    sizes = benchmark.sizes()
    try:
        if "paraphrase" in config.attacks:
            from simu_core.attacks.paraphrase import check_paraphrases

            check_paraphrases(benchmark)
        if "in_context" in config.attacks:
            from simu_core.attacks.in_context import check_sizes

            check_sizes(config.attack.in_context.k, config.attack.in_context.fraction, sizes["forget"])
        if config.data.requests:
            requests = expand_requests(config.data.requests, sizes["forget"])
            if knockout_runs(config):
                from simu_core.knockout import check_request_sizes

                check_request_sizes(requests)
        if config.relearn.enabled:
            check_attack_sizes(config.relearn, sizes["forget"], sizes["retain"])
    except ValueError as error:
        raise PreflightError(str(error)) from None


def knockout_runs(config: SimuConfig) -> bool:
    """Whether the run has a knockout check: a masked method with ``knockout.enabled``."""
    from simu_core.unlearning import get_method

    return config.knockout.enabled and get_method(config.unlearn.method).needs_mask


def _check_devices_and_memory(config: SimuConfig) -> None:
    """More devices than this machine has, or an unlearning stage that fits none of them even
    sharded: named before any stage runs (the inputs are known to exist by now)."""
    from simu_core.distributed import check_devices
    from simu_core.planning import PlanError, check_fits

    try:
        check_devices(config)
        check_fits(config)
    except (ValueError, PlanError) as error:
        raise PreflightError(str(error)) from None
