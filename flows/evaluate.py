"""``simu eval``: the benchmark's evaluation of a model the user brings, without unlearning.

    prepare_data -> evaluate_reference (when a reference is given) -> evaluate_target -> report

The model and the reference are ``model.target`` and ``model.retain_reference``, referenced by the
pipeline's own stages (``train_target`` / ``train_retain_reference`` return a reference keyed by
the model's content when it is given: a model that changed on disk or on the hub is evaluated
again). The evaluations are the pipeline's cached stages: ``simu run`` with the same target and
reference shares their entries. Same Parquet outputs; the ``runs.parquet`` row has kind ``eval``
(``simu report`` compares pipeline runs only).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.eval_inputs import eval_config, eval_run_name
from flows.pipeline import _StageRunner, recorded_if_unfinished
from tasks import stages as stage_tasks
from tasks.report import report


def _flow_run_name() -> str:
    parameters = flow_run.parameters or {}
    return eval_run_name(eval_config(parameters["model"], parameters.get("reference"),
                                     parameters.get("overrides") or [], parameters.get("config_path")))


@flow(name="simu-eval", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=True)
def simu_eval(model: str, reference: str | None = None, overrides: list[str] | None = None,
              config_path: str | None = None) -> dict[str, Any]:
    """Evaluate a model (folder or hub id) on the configured benchmark; return the run's summary."""
    config = eval_config(model, reference, overrides, config_path)
    run = _StageRunner(config)
    with recorded_if_unfinished(config, run, kind="eval"):
        data = run("prepare_data", stage_tasks.prepare_data, "prepare_data", {})
        # The given models' references (content-keyed), from the pipeline's own stages.
        model_ref = run("model", stage_tasks.train_target, "train_target", {"data": data})
        reference_ref = reference_eval = None
        if config.model.retain_reference:
            reference_ref = run("reference", stage_tasks.train_retain_reference, "train_retain_reference",
                                {"data": data})
            reference_eval = run("evaluate_reference", stage_tasks.evaluate_reference, "evaluate_reference",
                                 {"data": data, "model": reference_ref})
        model_eval = run("evaluate_target", stage_tasks.evaluate, "evaluate",
                         {"data": data, "model": model_ref, "reference_eval": reference_eval})
        refs = {"data": data, "target": model_ref, "reference": reference_ref, "evaluate_target": model_eval,
                "evaluate_reference": reference_eval}
        return report(config.model_dump(mode="json"), refs, run.states, run.seconds,
                      headline_ref="evaluate_target", kind="eval")
