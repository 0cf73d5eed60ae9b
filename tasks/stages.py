"""One Prefect task per pipeline stage: thin wrappers over ``simu_core.stages``.

Every task takes the full config (for the library call; excluded from the cache key), the store
URL, the stage's code version, the parameters it reads (the cache key) and its input references,
and returns its own store reference: a small, content-derived dict.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from simu_core import stages
from simu_core.attacks.names import ATTACKS, attack_stage
from simu_core.config import config_from_dict
from tasks.caching import external_model_ref, run_stage, stage_cache_policy

Ref = dict[str, Any]
_TASK_OPTIONS = dict(persist_result=True, retries=0)


@task(name="prepare_data", cache_policy=stage_cache_policy("prepare_data"), **_TASK_OPTIONS)
def prepare_data(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Load or generate the benchmark and write its splits."""
    cfg = config_from_dict(config)
    return run_stage("prepare_data", store_url, code_version, params, inputs,
                     lambda out, _: stages.prepare_data(cfg, out))


@task(name="select_request", cache_policy=stage_cache_policy("select_request"), **_TASK_OPTIONS)
def select_request(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """One deletion request's data: the prepared benchmark with the forget split cut to ``params['items']``."""
    return run_stage("select_request", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.select_request(dirs["data"], out, params["items"]))


def _train(config: dict, stage: str, which: str, external: str | None, store_url: str, code_version: str,
           params: dict, inputs: dict) -> Ref:
    """A training stage, or a reference to the model the user brings instead."""
    if external:
        return external_model_ref(external, params["external"])
    cfg = config_from_dict(config)
    return run_stage(stage, store_url, code_version, params, inputs,
                     lambda out, dirs: stages.train_model(cfg, dirs["data"], out, which))


@task(name="train_target", cache_policy=stage_cache_policy("train_target"), **_TASK_OPTIONS)
def train_target(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Fine-tune the target model on the full set (or reference the user's own target)."""
    return _train(config, "train_target", "target", config["model"]["target"], store_url, code_version, params, inputs)


@task(name="train_retain_reference", cache_policy=stage_cache_policy("train_retain_reference"), **_TASK_OPTIONS)
def train_retain_reference(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Fine-tune the retain reference on the retain split only (or reference the user's own)."""
    return _train(config, "train_retain_reference", "reference", config["model"]["retain_reference"], store_url,
                  code_version, params, inputs)


@task(name="attribute", cache_policy=stage_cache_policy("attribute"), **_TASK_OPTIONS)
def attribute(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Neuron attribution scores of the target on the forget or the retain set."""
    cfg = config_from_dict(config)
    return run_stage("attribute", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.attribute(cfg, dirs["data"], dirs["target"], out, params["which"]))


@task(name="threshold_mask", cache_policy=stage_cache_policy("threshold_mask"), **_TASK_OPTIONS)
def threshold_mask(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Critical-neuron mask and dual-neuron analysis at the configured threshold."""
    cfg = config_from_dict(config)
    return run_stage("threshold_mask", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.threshold_mask(cfg, dirs["forget_scores"], dirs["retain_scores"], out))


@task(name="knockout", cache_policy=stage_cache_policy("knockout"), **_TASK_OPTIONS)
def knockout(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Knockout check on the target (own attribution on half of the items, measured on the other half):
    critical vs random vs retain-critical neurons."""
    cfg = config_from_dict(config)
    return run_stage("knockout", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.knockout(cfg, dirs["data"], dirs["target"], out))


@task(name="unlearn", cache_policy=stage_cache_policy("unlearn"), **_TASK_OPTIONS)
def unlearn(config: dict, store_url: str, code_version: str, params: dict, inputs: dict, checkpoint_dir: str) -> Ref:
    """Run one unlearning method from the target (to a forgetting level with ``unlearn.stop_at``: the
    retain reference's evaluation is then an input); a progress artifact follows the steps."""
    cfg = config_from_dict(config)
    progress_id = create_progress_artifact(progress=0.0, description=f"unlearning ({cfg.unlearn.method})")

    def report_progress(step: int, total: int, _row: dict) -> None:
        if step == total or step % max(1, total // 20) == 0:
            update_progress_artifact(progress_id, progress=100.0 * step / total)

    return run_stage(
        "unlearn", store_url, code_version, params, inputs,
        lambda out, dirs: stages.unlearn(
            cfg, dirs["data"], dirs["target"], dirs.get("mask"), out,
            progress_callback=report_progress, checkpoint_dir=checkpoint_dir,
            reference_items_path=dirs["reference_eval"] / "items.parquet" if dirs.get("reference_eval") else None,
            alternates_dir=dirs.get("alternates"),
        ),
    )


@task(name="generate_alternates", cache_policy=stage_cache_policy("generate_alternates"), **_TASK_OPTIONS)
def generate_alternates(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """AltPO's alternate answers, sampled from the model the run unlearns."""
    cfg = config_from_dict(config)
    return run_stage("generate_alternates", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.generate_alternates(cfg, dirs["data"], dirs["model"], out))


@task(name="relearn", cache_policy=stage_cache_policy("relearn"), **_TASK_OPTIONS)
def relearn(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """Relearning attack on a model: a few fine-tuning steps, the held-out forget items measured."""
    cfg = config_from_dict(config)
    return run_stage("relearn", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.relearn(cfg, dirs["data"], dirs["model"], out))


def _attack_task(attack: str, stage: str):
    """The Prefect task of one attack's stage (``simu_core.stages.<stage>`` on one model)."""
    function = getattr(stages, stage)

    @task(name=stage, cache_policy=stage_cache_policy(stage), **_TASK_OPTIONS)
    def attack_task(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
        cfg = config_from_dict(config)
        return run_stage(stage, store_url, code_version, params, inputs,
                         lambda out, dirs: function(cfg, dirs["data"], dirs["model"], out))

    attack_task.__doc__ = f"The {attack} attack on a model ({function.__doc__.splitlines()[0]})"
    return attack_task


#: The task of every attack but relearning (its own task above), by attack name.
ATTACK_TASKS = {attack: _attack_task(attack, attack_stage(attack)) for attack in ATTACKS if attack != "relearn"}
ATTACK_TASKS["relearn"] = relearn


@task(name="evaluate", cache_policy=stage_cache_policy("evaluate"), **_TASK_OPTIONS)
def evaluate(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """The benchmark's metric suite on a model (against the retain reference's items if given)."""
    cfg = config_from_dict(config)

    def compute(out, dirs):
        reference_items = dirs.get("reference_eval") / "items.parquet" if dirs.get("reference_eval") else None
        return stages.evaluate(cfg, dirs["data"], dirs["model"], out, reference_items_path=reference_items)

    return run_stage("evaluate", store_url, code_version, params, inputs, compute)


@task(name="evaluate_reference", cache_policy=stage_cache_policy("evaluate_reference"), **_TASK_OPTIONS)
def evaluate_reference(config: dict, store_url: str, code_version: str, params: dict, inputs: dict) -> Ref:
    """The retain reference: only what is compared with it, or the whole suite (``eval.reference_full``)."""
    cfg = config_from_dict(config)
    return run_stage("evaluate_reference", store_url, code_version, params, inputs,
                     lambda out, dirs: stages.evaluate(cfg, dirs["data"], dirs["model"], out, light=not params["full"]))
