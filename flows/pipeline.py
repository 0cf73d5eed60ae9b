"""The SIMU pipeline flow: one run from a config, every stage a cached task.

    prepare_data -> train_target -> attribute(forget), attribute(retain) -> threshold_mask
                 -> knockout (check of attribution + threshold on the target, on held-out items)
                 -> unlearn -> evaluate(unlearned, vs the retain reference) -> report
                 -> train_retain_reference -> evaluate(reference)
    attacks (quantize, paraphrase, in_context, logit_lens, relearn): each attack on the unlearned model,
                 the target and the reference (the last two cached for every method) -> robustness in the report

With ``data.requests`` (sequential deletion requests), per request i after the trainings:
    select(request i), select_seen(requests 1..i) -> attribute, threshold_mask, knockout (on model i-1)
                 -> unlearn(model i-1 -> model i) -> evaluate(model i on requests 1..i, vs the reference)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from flows import lifecycle
from flows.lifecycle import raise_if_stopping
from flows.params import run_name, stage_params, uses_mask
from simu_core.config import ConfigError, SimuConfig, check_pipeline_models, load_config
from simu_core.method_names import parse_method
from tasks import stages as stage_tasks
from tasks.caching import entry_is_valid, open_store
from tasks.report import append_run_row, current_run_id, report, report_requests, run_row
from tasks.versions import stage_code_version


def _flow_run_name() -> str:
    parameters = flow_run.parameters or {}
    config = load_config(parameters.get("config_path"), parameters.get("overrides") or [])
    return run_name(config)


class _StageRunner:
    """Calls stage tasks with the shared arguments and records state and wall time per stage."""

    def __init__(self, config: SimuConfig) -> None:
        self.config = config
        self.raw = config.model_dump(mode="json")
        self.params = stage_params(config)
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}  # stages running now (label: start time)

    def __call__(self, label: str, task: Callable, stage: str, inputs: dict, extra_params: dict | None = None, **kwargs: Any) -> dict:
        raise_if_stopping()  # a stopping command (SIGTERM, Ctrl-C) starts no further stage
        params = {**self.params[stage], **(extra_params or {})}
        version = stage_code_version(stage)
        started = self.started[label] = time.perf_counter()
        external = stage in ("train_target", "train_retain_reference") and self._external_model(stage)
        refresh = not external and not entry_is_valid(self.config.run.store, stage, version, params, inputs)
        try:
            state = task.with_options(task_run_name=label, refresh_cache=refresh)(
                self.raw, self.config.run.store, version, params, inputs, return_state=True, **kwargs
            )
        except BaseException as error:  # interrupted inside the stage: the runs row names it
            self.seconds[label] = round(time.perf_counter() - started, 3)
            self.states[label] = "Failed" if isinstance(error, Exception) else "Interrupted"
            raise
        finally:
            self.started.pop(label, None)
        self.seconds[label] = round(time.perf_counter() - started, 3)
        self.states[label] = state.name
        return state.result()


    def _external_model(self, stage: str) -> bool:
        model = self.config.model
        return bool(model.target if stage == "train_target" else model.retain_reference)


def checkpoint_folder(config: SimuConfig) -> str:
    """Local folder for unlearning checkpoints (resume after a crash)."""
    store = config.run.store
    root = Path(store) if "://" not in store else Path.home() / ".cache" / "simu"
    return str(root / ".checkpoints")


@flow(name="simu-pipeline", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=True)
def simu_pipeline(overrides: list[str] | None = None, config_path: str | None = None) -> dict[str, Any]:
    """Run SIMU (or a baseline) end to end on one configuration; return the run's summary."""
    config = load_config(config_path, overrides or [])
    check_pipeline_models(config)
    run = _StageRunner(config)
    with recorded_if_unfinished(config, run):
        return _run_sequential(config, run) if config.data.requests else _run_stages(config, run)


@contextmanager
def recorded_if_unfinished(config: SimuConfig, run: _StageRunner, kind: str = "run") -> Iterator[None]:
    """A run that does not complete gets its runs-table row too, so sweeps can see what broke:
    status 'failed' (an error), or 'interrupted' (Ctrl-C, SIGTERM; also when the stopping process
    ends while this run is still inside a stage in another thread: :func:`lifecycle.on_forced_exit`)."""
    run_id, name = current_run_id(), flow_run.name or ""

    def record(error: BaseException) -> None:
        status = "failed" if isinstance(error, Exception) else "interrupted"
        states, seconds = dict(run.states), dict(run.seconds)
        for label, started in list(run.started.items()):  # still inside these stages
            states.setdefault(label, "Interrupted")
            seconds.setdefault(label, round(time.perf_counter() - started, 3))
        append_run_row(Path(config.run.results).resolve(),
                       run_row(config, run_id, status, {}, states, seconds, error=repr(error)[:2000], kind=kind,
                               run_name=name))

    token = lifecycle.on_forced_exit(lambda signum: record(lifecycle.Interrupted(signum)))
    try:
        yield
    except (Exception, KeyboardInterrupt, TerminationSignal) as error:
        if lifecycle.forget(token):  # else the stopping process recorded it already
            record(error)
        raise
    finally:
        lifecycle.forget(token)


def has_retain_reference(config: SimuConfig) -> bool:
    """Whether the run builds (or takes) and evaluates a retain reference.

    TOFU-style benchmarks and MUSE: always (forget quality, privleak and the stop level compare
    with it). LUME and WMDP (the registry's ``retain_reference``): their scores compare with no
    retain model, so only when its full evaluation is asked for (``eval.reference_full``) and a
    retain model can be had.
    """
    from simu_core.benchmarks.info import BENCHMARK_INFO

    model = config.model
    if not BENCHMARK_INFO[config.data.benchmark].retain_reference:
        return config.eval.reference_full and bool(model.retain_reference or model.base)
    return True


def check_attack_sizes(config: SimuConfig, data: dict) -> None:
    """Before any training: the parts of the forget set the attacks split it into are not empty, the
    in-context attack has ``k`` items to show and the paraphrase attack has paraphrased questions."""
    from simu_core.benchmarks.info import BENCHMARK_INFO

    if not config.attacks:
        return
    sizes = stage_summary(config, data)
    try:
        # A corpus benchmark relearns on all its forget or retain windows: no split to check.
        if config.relearn.enabled and BENCHMARK_INFO[config.data.benchmark].item_kind != "text":
            from simu_core.attacks.relearn import check_attack_sizes as check_relearn

            check_relearn(config.relearn, sizes["forget"], sizes["retain"])
        if "in_context" in config.attacks:
            from simu_core.attacks.in_context import check_sizes

            check_sizes(config.attack.in_context.k, config.attack.in_context.fraction, sizes["forget"])
        if "paraphrase" in config.attacks:
            from simu_core.attacks.paraphrase import check_paraphrases
            from simu_core.stages import read_benchmark

            check_paraphrases(read_benchmark(open_store(config.run.store).local_dir(data)))
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None


def stage_summary(config: SimuConfig, ref: dict) -> dict[str, Any]:
    """The summary a stage stored with its output (prepare_data: the split sizes)."""
    return open_store(config.run.store).manifest(ref).get("metadata", {}).get("summary") or {}


def attack_stages(config: SimuConfig, run: _StageRunner, data: dict, models: dict[str, dict | None]) -> dict[str, dict]:
    """Every attack of ``attacks`` on each model (``models``: 'unlearned', 'target', 'reference' -> ref;
    a run without a retain reference, WMDP's, attacks the other two), labelled by
    :func:`~simu_core.attacks.names.attack_label`; the target's and the reference's are shared by every
    run with the same data and settings (cached)."""
    from simu_core.attacks.names import attack_label, attack_stage

    return {attack_label(attack, name): run(attack_label(attack, name), stage_tasks.ATTACK_TASKS[attack],
                                            attack_stage(attack), {"data": data, "model": model})
            for attack in config.attacks for name, model in models.items() if model is not None}


def mask_stages(config: SimuConfig, run: _StageRunner, data: dict, target: dict,
                prefix: str = "") -> dict[str, dict | None]:
    """Masked methods: attribution of ``target`` on ``data``'s forget and retain items, the mask and
    (``knockout.enabled``) the knockout check of the method on held-out items; every ref None for the
    other methods."""
    refs: dict[str, dict | None] = dict.fromkeys(("forget_scores", "retain_scores", "mask", "knockout"))
    if not uses_mask(config):
        return refs
    for which in ("forget", "retain"):
        refs[f"{which}_scores"] = run(f"{prefix}attribute_{which}", stage_tasks.attribute, "attribute",
                                      {"data": data, "target": target}, {"which": which})
    refs["mask"] = run(f"{prefix}threshold_mask", stage_tasks.threshold_mask, "threshold_mask",
                       {"forget_scores": refs["forget_scores"], "retain_scores": refs["retain_scores"]})
    if config.knockout.enabled:
        # Its own attribution on half of the items: it reads the target, not the run's mask.
        refs["knockout"] = run(f"{prefix}knockout", stage_tasks.knockout, "knockout", {"data": data, "target": target})
    return refs


def alternates_stage(config: SimuConfig, run: _StageRunner, data: dict, model: dict, prefix: str = "") -> dict | None:
    """AltPO: the alternate answers the model it unlearns writes for ``data``'s forget items; None otherwise."""
    if parse_method(config.unlearn.method).loss != "altpo":
        return None
    return run(f"{prefix}generate_alternates", stage_tasks.generate_alternates, "generate_alternates",
               {"data": data, "model": model})


def stops_on_reference(config: SimuConfig) -> bool:
    """Whether unlearning reads the retain reference's evaluation (``unlearn.stop_at`` with a
    ``reference`` level, or on forget quality)."""
    from simu_core.stopping import parse_stop_at

    return config.unlearn.stop_at is not None and parse_stop_at(config.unlearn.stop_at).uses_reference


def unlearn_inputs(config: SimuConfig, data: dict, target: dict, mask: dict | None,
                   reference_eval: dict | None, alternates: dict | None = None) -> dict[str, dict | None]:
    """The unlearn stage's inputs; the retain reference's evaluation only when the stop rule reads it
    and AltPO's alternates only for altpo (so other runs keep their keys)."""
    inputs = {"data": data, "target": target, "mask": mask}
    if alternates is not None:
        inputs["alternates"] = alternates
    if stops_on_reference(config):
        if reference_eval is None:
            raise ConfigError(f"invalid config: unlearn.stop_at={config.unlearn.stop_at!r} needs a retain reference, "
                              "and this run has none")
        inputs["reference_eval"] = reference_eval
    return inputs


def check_stop_budget(config: SimuConfig, forget_items: int, where: str = "the forget split") -> None:
    """Before any training: ``unlearn.eval_every`` fits in the run's steps (a run checked never but
    at its end cannot stop at a level)."""
    settings = config.unlearn
    if settings.stop_at is None:
        return
    from simu_core.stopping import budget_steps

    steps = budget_steps(forget_items, settings.batch_size, settings.grad_accum, settings.epochs, settings.max_steps)
    if settings.eval_every > steps:
        raise ConfigError(
            f"invalid config: unlearn.eval_every={settings.eval_every} is larger than the run's {steps} optimizer steps "
            f"({where}: {forget_items} forget items, batch {settings.batch_size} x grad_accum {settings.grad_accum}, "
            f"{settings.epochs} epochs, max_steps {settings.max_steps}): lower eval_every or raise the budget"
        )


def _run_stages(config: SimuConfig, run: _StageRunner) -> dict[str, Any]:
    data = run("prepare_data", stage_tasks.prepare_data, "prepare_data", {})
    check_attack_sizes(config, data)
    check_stop_budget(config, stage_summary(config, data)["forget"])
    target = run("train_target", stage_tasks.train_target, "train_target", {"data": data})
    reference = reference_eval = None
    if has_retain_reference(config):
        reference = run("train_retain_reference", stage_tasks.train_retain_reference, "train_retain_reference",
                        {"data": data})
    masking = mask_stages(config, run, data, target)
    if reference is not None:  # before unlearning: a stop at the reference's level reads it
        reference_eval = run("evaluate_reference", stage_tasks.evaluate_reference, "evaluate_reference",
                             {"data": data, "model": reference})
    alternates = alternates_stage(config, run, data, target)
    unlearned = run("unlearn", stage_tasks.unlearn, "unlearn",
                    unlearn_inputs(config, data, target, masking["mask"], reference_eval, alternates),
                    checkpoint_dir=checkpoint_folder(config))
    target_eval = run("evaluate_target", stage_tasks.evaluate, "evaluate",
                      {"data": data, "model": target, "reference_eval": reference_eval})
    unlearned_eval = run("evaluate", stage_tasks.evaluate, "evaluate",
                         {"data": data, "model": unlearned, "reference_eval": reference_eval})
    attacked = attack_stages(config, run, data, {"unlearned": unlearned, "target": target, "reference": reference})
    refs = {
        "data": data, "target": target, "reference": reference, **masking, "unlearned": unlearned,
        "evaluate": unlearned_eval,
        "evaluate_target": target_eval, "evaluate_reference": reference_eval, **attacked,
    }
    return report(config.model_dump(mode="json"), refs, run.states, run.seconds)


def _run_sequential(config: SimuConfig, run: _StageRunner) -> dict[str, Any]:
    """Deletion requests one after another (``data.requests``): request i unlearns its own items
    from the model request i-1 produced and is evaluated on every request so far, against the
    retain reference (which never saw a forget item, so it serves every union)."""
    data = run("prepare_data", stage_tasks.prepare_data, "prepare_data", {})
    requests = deletion_requests(config, data)  # before any training: items the benchmark lacks
    for index, items in enumerate(requests, 1):
        check_stop_budget(config, len(items), f"request {index}")
    target = run("train_target", stage_tasks.train_target, "train_target", {"data": data})
    reference = run("train_retain_reference", stage_tasks.train_retain_reference, "train_retain_reference",
                    {"data": data})
    done = run_requests(config, run, data, requests, target, reference)
    return report_requests(config.model_dump(mode="json"), {"data": data, "target": target, "reference": reference},
                           done, run.states, run.seconds)


def deletion_requests(config: SimuConfig, data: dict) -> list[list[str]]:
    """The item ids of every request, checked against the prepared forget split's size (and, with
    the knockout check, at least 2 items each)."""
    from simu_core.requests import expand_requests

    try:
        requests = expand_requests(config.data.requests, stage_summary(config, data)["forget"])
        if config.knockout.enabled and uses_mask(config):
            from simu_core.knockout import check_request_sizes

            check_request_sizes(requests)  # it halves each request's items
        return requests
    except ValueError as error:  # RequestError, or a request too small for the knockout check
        raise ConfigError(f"invalid config: {error}") from None


def run_requests(config: SimuConfig, run: _StageRunner, data: dict, requests: list[list[str]], target: dict,
                 reference: dict) -> list[dict[str, Any]]:
    """Every request's stages in order, each from the model the one before produced; per request
    its index, the forget items seen so far and its stages' refs. The union so far is in
    :func:`~simu_core.requests.union_order`, so that an ``eval.max_items`` cut holds items of every request."""
    from simu_core.requests import union_order

    model, done = target, []
    for index, items in enumerate(requests, 1):
        seen = union_order(requests[:index])
        refs = run_request(config, run, f"request{index}", data, items, seen, model, reference)
        done.append({"index": index, "items": len(seen), "own_items": list(items), "refs": refs})
        model = refs["unlearned"]
    return done


def run_request(config: SimuConfig, run: _StageRunner, label: str, data: dict, items: list[str], seen: list[str],
                model: dict, reference: dict) -> dict[str, dict | None]:
    """One request's stages, labelled ``<label>.<stage>``: its items' data (``select``) and the
    union so far (``select_seen``; request 1's union is its own data), the mask on ``model``,
    unlearning from ``model``, the evaluation on the union."""
    own = run(f"{label}.select", stage_tasks.select_request, "select_request", {"data": data}, {"items": items})
    union = own if seen == items else run(f"{label}.select_seen", stage_tasks.select_request, "select_request",
                                          {"data": data}, {"items": seen})
    masking = mask_stages(config, run, own, model, prefix=f"{label}.")
    reference_eval = run(f"{label}.evaluate_reference", stage_tasks.evaluate_reference, "evaluate_reference",
                         {"data": union, "model": reference})
    # A stop level is read on the request's own items (what this unlearning removes).
    own_reference_eval = reference_eval
    if stops_on_reference(config) and own is not union:
        own_reference_eval = run(f"{label}.evaluate_reference_request", stage_tasks.evaluate_reference,
                                 "evaluate_reference", {"data": own, "model": reference})
    alternates = alternates_stage(config, run, own, model, prefix=f"{label}.")
    unlearned = run(f"{label}.unlearn", stage_tasks.unlearn, "unlearn",
                    unlearn_inputs(config, own, model, masking["mask"], own_reference_eval, alternates),
                    checkpoint_dir=checkpoint_folder(config))
    evaluation = run(f"{label}.evaluate", stage_tasks.evaluate, "evaluate",
                     {"data": union, "model": unlearned, "reference_eval": reference_eval})
    return {"data": union, "request_data": own, "start": model, **masking, "unlearned": unlearned,
            "evaluate": evaluation, "evaluate_reference": reference_eval}
