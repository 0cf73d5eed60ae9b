"""Stopping unlearning at a forgetting level (``unlearn.stop_at``, ``simu_core.stopping``)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from simu_core.config import ConfigError, load_config
from simu_core.stopping import (TRAJECTORY_COLUMNS, ForgetMonitor, StopRule, budget_steps, format_outcome,
                                parse_stop_at)

from tests.conftest import SMALL_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("text, rule", [
    ("forget_prob<=reference", StopRule("forget_prob", "<=", None)),
    (" forget_prob <= 0.15 ", StopRule("forget_prob", "<=", 0.15)),
    ("forget_quality>=0.05", StopRule("forget_quality", ">=", 0.05)),
])
def test_stop_rules_parse(text, rule):
    assert parse_stop_at(text) == rule
    assert load_config(overrides=[f"unlearn.stop_at={text}"]).unlearn.stop_at == rule.text()


@pytest.mark.parametrize("text, message", [
    ("forget_rouge<=0.1", "unknown forget measure 'forget_rouge'"),
    ("forget_prob>=0.1", "forget_prob<=0.1"),  # the direction unlearning moves it
    ("forget_quality<0.05", "forget_quality>=0.05"),
    ("forget_quality>=reference", "1 by definition"),
    ("forget_prob<=lots", "neither a number nor 'reference'"),
    ("forget_prob<=1.5", "must be in (0, 1]"),
    ("forget_prob", "is not '<measure><comparison><level>'"),
])
def test_bad_stop_rules_name_the_problem(text, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[f"unlearn.stop_at={text}"])
    assert "unlearn.stop_at" in str(error.value) and message in str(error.value)


def test_stop_at_is_refused_where_it_cannot_run(tmp_path):
    from simu_core.config import check_pipeline_models

    lume = load_config(overrides=["data.benchmark=lume", f"model.target={tmp_path}", "unlearn.stop_at=forget_prob<=0.1"])
    with pytest.raises(ConfigError, match="data.benchmark='lume'.*Set unlearn.stop_at=null"):
        check_pipeline_models(lume)  # the pipeline refuses it; `simu eval` of a LUME model unlearns nothing
    check_pipeline_models(lume.model_copy(update={"unlearn": lume.unlearn.model_copy(update={"stop_at": None})}))


def test_eval_every_beyond_the_budget_is_refused_before_any_training():
    from flows.pipeline import check_stop_budget

    config = load_config(overrides=["unlearn.stop_at=forget_prob<=reference", "unlearn.epochs=2",
                                     "unlearn.batch_size=4", "unlearn.eval_every=25"])
    assert budget_steps(40, 4, 1, 2, None) == 20
    with pytest.raises(ConfigError, match=r"unlearn.eval_every=25 is larger than the run's 20 optimizer steps"):
        check_stop_budget(config, 40)
    check_stop_budget(config.model_copy(update={"unlearn": config.unlearn.model_copy(update={"eval_every": 20})}), 40)


def test_stop_at_without_a_reference_run_is_refused():
    from flows.pipeline import unlearn_inputs

    config = load_config(overrides=["unlearn.stop_at=forget_prob<=reference"])
    with pytest.raises(ConfigError, match="needs a retain reference"):
        unlearn_inputs(config, {"key": "d"}, {"key": "t"}, None, None)
    # A numeric forget-probability level reads no reference: the stage's inputs stay as without stop_at.
    numeric = load_config(overrides=["unlearn.stop_at=forget_prob<=0.2"])
    assert set(unlearn_inputs(numeric, {"key": "d"}, {"key": "t"}, None, None)) == {"data", "target", "mask"}


# ------------------------------------------------------------------------------ checks and status


class _Scripted(ForgetMonitor):
    """A monitor whose measurements follow a script (step -> forget probability)."""

    def __init__(self, values: dict[int, float], level: float, eval_every: int = 10, tolerance: float = 0.1):
        self.rule = StopRule("forget_prob", "<=", level)
        self.level, self.level_source, self.tolerance, self.eval_every = level, "value", tolerance, eval_every
        self.values, self.rows, self.chosen, self.columns = values, [], None, TRAJECTORY_COLUMNS

    def measure(self) -> dict[str, float]:
        return {"forget_prob": self.values[self._step], "forget_quality": math.nan, "forget_truth_ratio": math.nan,
                "retain_prob": 0.9}

    def check(self, step: int, lr: float, fraction: float = 1.0) -> bool:
        self._step = step
        return super().check(step, lr, fraction)


def _run_script(monitor: _Scripted, total: int) -> list[int]:
    if monitor.check(0, 0.0):
        return [0]
    for step in range(1, total + 1):
        if monitor.due(step, total) and monitor.check(step, 1e-3):
            break
    return [row["step"] for row in monitor.rows]


def test_checks_come_every_eval_every_steps_and_sooner_near_the_level():
    # Forgetting that accelerates (log-probability falling faster and faster), as the testbed's curves do.
    values = {step: 0.9 * math.exp(-0.002 * step * step) for step in range(101)}
    level = 0.15
    first = next(step for step, value in values.items() if value <= level)
    monitor = _Scripted(values, level)
    steps = _run_script(monitor, 100)
    assert steps[:3] == [0, 10, 20]  # regular checks while the level is far
    assert steps[-1] == first  # the first step at the level is where it stops
    assert len(steps) <= 8
    outcome = monitor.outcome(100)
    assert outcome["stop_status"] == "matched" and outcome["stop_step"] == first
    assert outcome["stop_previous_step"] == steps[-2]
    assert outcome["stop_value"] == pytest.approx(values[first])


def test_statuses_overshot_not_reached_and_at_start():
    far = {step: (0.9 if step < 10 else 0.01) for step in range(51)}
    monitor = _Scripted(far, 0.15)
    _run_script(monitor, 50)
    outcome = monitor.outcome(50)
    assert outcome["stop_status"] == "overshot" and outcome["stop_first_check"] and not outcome["stop_matched"]
    assert "already past it at the first check" in format_outcome(outcome)

    never = {step: 0.9 - 0.001 * step for step in range(51)}
    monitor = _Scripted(never, 0.15)
    assert _run_script(monitor, 50)[-1] == 50
    outcome = monitor.outcome(50)
    assert outcome["stop_status"] == "not_reached" and outcome["stop_step"] == 50
    assert "never reached" in format_outcome(outcome)

    monitor = _Scripted({0: 0.1}, 0.15)
    assert _run_script(monitor, 50) == [0]
    assert monitor.outcome(50)["stop_status"] == "at_start"


class _Continuous(ForgetMonitor):
    """A monitor of a model whose forget probability is a function of its training position
    (steps taken, fractions included); ``apply`` plays the trainer's fraction setter."""

    def __init__(self, curve, level: float, eval_every: int = 10, tolerance: float = 0.1):
        self.rule = StopRule("forget_prob", "<=", level)
        self.level, self.level_source, self.tolerance, self.eval_every = level, "value", tolerance, eval_every
        self.curve, self.rows, self.chosen, self.position = curve, [], None, 0.0
        self.columns = TRAJECTORY_COLUMNS

    def measure(self) -> dict[str, float]:
        return {"forget_prob": self.curve(self.position), "forget_quality": math.nan, "forget_truth_ratio": math.nan,
                "retain_prob": 0.9}

    def run(self, total: int, halvings: int) -> None:
        if self.check(0, 0.0):
            return
        for step in range(1, total + 1):
            self.position = float(step)
            if self.due(step, total) and self.check(step, 1e-3):
                def apply(fraction: float, step: int = step) -> None:
                    self.position = step - 1 + fraction
                self.refine(step, 1e-3, apply, halvings)
                return


def test_refining_bisects_the_step_that_crossed_the_level():
    # Each step divides the forget probability by 3 near the level: a whole-step stop lands up to 67 % past it.
    curve = lambda position: 0.9 * 3.0 ** -position  # noqa: E731
    level = 0.0005  # crossed between steps 6 and 7 (6.82 steps)
    plain = _Continuous(curve, level, eval_every=1)
    plain.run(20, halvings=0)
    assert plain.outcome(20)["stop_status"] == "overshot" and plain.outcome(20)["stop_step"] == 7
    refined = _Continuous(curve, level, eval_every=1)
    refined.run(20, halvings=6)
    outcome = refined.outcome(20)
    crossing = math.log(0.9 / level, 3)
    assert outcome["stop_status"] == "matched" and outcome["stop_step"] == 7
    # The smallest fraction that reaches the level, to 1/64 of a step; the model is left there.
    assert crossing <= 6 + outcome["stop_fraction"] < crossing + 1 / 64
    assert refined.position == pytest.approx(6 + outcome["stop_fraction"])
    assert outcome["stop_value"] == pytest.approx(curve(6 + outcome["stop_fraction"])) and outcome["stop_value"] <= level
    assert outcome["stop_refine_checks"] == 6
    # The check before: the largest fraction that had not reached it, less than 1/64 step earlier.
    assert outcome["stop_previous_step"] == 7 and outcome["stop_previous_value"] > level
    assert 0 < outcome["stop_fraction"] - outcome["stop_previous_fraction"] <= 1 / 64
    assert "refined" in format_outcome(outcome) and "matched" in format_outcome(outcome)
    trajectory = refined.trajectory()
    positions = (trajectory["step"] - 1 + trajectory["fraction"]).to_numpy()
    assert (np.diff(positions) > 0).all() and len(trajectory) == len(refined.rows)


def test_refining_measures_the_step_before_when_no_check_did():
    # Checks every 10 steps from a slow start: the check at 10 is the first past the level.
    curve = lambda position: 0.9 * 2.0 ** -position  # noqa: E731
    refined = _Continuous(curve, 0.9 * 2.0 ** -9.3, eval_every=10)
    refined.run(50, halvings=4)
    steps = [(row["step"], row["fraction"]) for row in refined.rows]
    assert steps[:3] == [(0, 1.0), (10, 1.0), (9, 1.0)]  # the model after step 9 is measured first
    outcome = refined.outcome(50)
    assert outcome["stop_step"] == outcome["stop_previous_step"] == 10
    assert 0.3 <= outcome["stop_fraction"] < 0.3 + 1 / 16 and outcome["stop_status"] == "matched"
    assert outcome["stop_previous_fraction"] == outcome["stop_fraction"] - 1 / 16
    # When the step before already reached the level, the crossing lies further back: that nearer model is kept.
    early = _Continuous(curve, 0.9 * 2.0 ** -4.5, eval_every=10)
    early.run(50, halvings=4)
    outcome = early.outcome(50)
    assert (outcome["stop_step"], outcome["stop_fraction"]) == (9, 1.0) and early.position == 9.0
    assert outcome["stop_status"] == "overshot" and outcome["stop_refine_checks"] == 1


def test_the_fraction_setter_keeps_frozen_entries_bit_identical():
    from types import SimpleNamespace

    from simu_core.unlearning.trainer import Trainable, UnlearningTrainer

    weight = torch.nn.Parameter(torch.tensor([[-0.0, 1.0, 2.0], [3.0, -4.0, 5.0]], dtype=torch.bfloat16))
    stub = SimpleNamespace(trainables=[Trainable("w", weight)])
    stub._snapshot = lambda: UnlearningTrainer._snapshot(stub)
    before = stub._snapshot()
    with torch.no_grad():  # the "step": column 1 frozen (unchanged), the others moved
        weight[:, 0] += 1.0
        weight[:, 2] -= 2.0
    after = weight.detach().clone()
    apply = UnlearningTrainer._fraction_setter(stub, before)
    for fraction in (0.25, 0.5, 0.0, 1.0):
        apply(fraction)
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight[:, 1].view(torch.int16), after[:, 1].view(torch.int16))  # bits, signs of zeros too
        expected = before[0] + fraction * (after.float() - before[0])
        assert torch.equal(weight.float()[:, [0, 2]], expected.to(torch.bfloat16).float()[:, [0, 2]])
    apply(0.0)
    assert torch.equal(weight.view(torch.int16), before[0].to(torch.bfloat16).view(torch.int16))


def test_stop_refine_is_refused_without_a_level_or_when_sharded():
    from simu_core.config import check_pipeline_models

    with pytest.raises(ConfigError, match="unlearn.stop_refine=4 without unlearn.stop_at"):
        check_pipeline_models(load_config(overrides=["unlearn.stop_at=null", "unlearn.stop_refine=4"]))
    with pytest.raises(ConfigError, match="unlearn.stop_refine=4 with run.devices=2"):
        check_pipeline_models(load_config(overrides=["unlearn.stop_at=forget_prob<=reference", "unlearn.stop_refine=4",
                                                     "run.devices=2"]))


# ------------------------------------------------------------------------- on a trained model


@pytest.fixture(scope="module")
def reference_items(trained_small, tmp_path_factory):
    from simu_core import stages

    config = trained_small["config"]
    out = tmp_path_factory.mktemp("reference-eval")
    stages.evaluate(config, trained_small["data"], trained_small["reference"], out, light=True)
    return out / "items.parquet"


def _config(*extra: str):
    return load_config(overrides=[*SMALL_OVERRIDES, "unlearn.method=fo_graddiff", "unlearn.lr=1e-3",
                                  "unlearn.epochs=3", "unlearn.batch_size=4", "eval.batch_size=32", *extra])


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.mark.slow
def test_checks_do_not_change_the_training(trained_small, reference_items, tmp_path):
    """A level never reached: the checks run, and the model is bit for bit the one without them."""
    from simu_core import stages

    plain = stages.unlearn(_config(), trained_small["data"], trained_small["target"], None, tmp_path / "plain",
                           progress=False)
    checked = stages.unlearn(_config("unlearn.stop_at=forget_prob<=1e-9", "unlearn.eval_every=5"),
                             trained_small["data"], trained_small["target"], None, tmp_path / "checked",
                             progress=False, reference_items_path=reference_items)
    assert checked["steps"] == plain["steps"] == checked["stop_budget_steps"] == 15  # 20 forget items, batch 4
    assert checked["stop_status"] == "not_reached"
    trajectory = pd.read_parquet(tmp_path / "checked" / "trajectory.parquet")
    assert trajectory["step"].tolist() == [0, 5, 10, 15]
    for name, tensor in _weights(tmp_path / "plain").items():
        assert torch.equal(tensor, _weights(tmp_path / "checked")[name]), name


@pytest.mark.slow
def test_a_stopped_run_keeps_the_model_of_its_stopping_check(trained_small, reference_items, tmp_path):
    from simu_core import stages

    config = _config("unlearn.stop_at=forget_prob<=reference", "unlearn.eval_every=2", "unlearn.epochs=10")
    summary = stages.unlearn(config, trained_small["data"], trained_small["target"], None, tmp_path / "stopped",
                             progress=False, reference_items_path=reference_items)
    trajectory = pd.read_parquet(tmp_path / "stopped" / "trajectory.parquet")
    reference = pd.read_parquet(reference_items)
    level = float(reference[reference["split"] == "forget"]["probability"].mean())
    assert summary["stop_level"] == pytest.approx(level) and summary["stop_level_source"] == "reference"
    assert summary["stop_status"] in ("matched", "overshot")
    assert summary["steps"] == summary["stop_step"] == int(trajectory["step"].iloc[-1]) < summary["stop_budget_steps"]
    assert trajectory["reached"].tolist() == [False] * (len(trajectory) - 1) + [True]
    assert summary["stop_value"] <= level < summary["stop_previous_value"]
    # The saved model is the one measured at the stop: its evaluation reads the same forget probability.
    evaluation = stages.evaluate(config, trained_small["data"], tmp_path / "stopped", tmp_path / "eval",
                                 reference_items_path=reference_items)
    assert evaluation["forget_prob"] == pytest.approx(summary["stop_value"], rel=1e-5)
    assert float(trajectory["retain_prob"].iloc[-1]) == pytest.approx(
        float(np.mean(pd.read_parquet(tmp_path / "eval" / "items.parquet").query("split == 'retain_eval'")
                      ["probability"].iloc[: config.unlearn.stop_retain_items])), rel=1e-5)


@pytest.mark.slow
def test_a_refined_stop_keeps_the_bisected_model(trained_small, reference_items, tmp_path):
    """unlearn.stop_refine: the saved model is the one the last refinement check measured (its evaluation
    reads the same forget probability), on the level's side and nearer to it than the whole-step stop."""
    from simu_core import stages

    stop = ["unlearn.stop_at=forget_prob<=reference", "unlearn.eval_every=2", "unlearn.epochs=10"]
    plain = stages.unlearn(_config(*stop), trained_small["data"], trained_small["target"], None, tmp_path / "plain",
                           progress=False, reference_items_path=reference_items)
    config = _config(*stop, "unlearn.stop_refine=5")
    refined = stages.unlearn(config, trained_small["data"], trained_small["target"], None, tmp_path / "refined",
                             progress=False, reference_items_path=reference_items)
    level = refined["stop_level"]
    assert refined["stop_value"] <= level < refined["stop_previous_value"]
    assert plain["stop_value"] <= refined["stop_value"]  # never further past than the whole step
    assert refined["stop_step"] in (plain["stop_step"], plain["stop_step"] - 1)
    if refined["stop_step"] == plain["stop_step"]:  # bisected (else the step before had reached it already)
        assert refined["stop_refine_checks"] >= 5 and 0 < refined["stop_fraction"] <= 1
    trajectory = pd.read_parquet(tmp_path / "refined" / "trajectory.parquet")
    assert len(trajectory) == plain["stop_checks"] + refined["stop_refine_checks"]
    evaluation = stages.evaluate(config, trained_small["data"], tmp_path / "refined", tmp_path / "eval",
                                 reference_items_path=reference_items)
    assert evaluation["forget_prob"] == pytest.approx(refined["stop_value"], rel=1e-5)


@pytest.mark.slow
def test_forget_quality_checks_use_the_suites_truth_ratios(trained_small, reference_items, tmp_path):
    from simu_core import stages
    from simu_core.evaluation.qa import evaluation_splits, forget_answer_scores, score_items

    config = _config("unlearn.stop_at=forget_quality>=0.9", "unlearn.eval_every=10")
    model, tokenizer = stages.load_trained(trained_small["target"], config)
    forget = evaluation_splits(stages.read_benchmark(trained_small["data"]))["forget"]
    fast = forget_answer_scores(model, tokenizer, forget, config.eval, max_length=config.model.max_length)
    full = score_items(model, tokenizer, {"forget": forget}, config.eval, max_length=config.model.max_length,
                       generate=False)
    np.testing.assert_array_equal(fast["truth_ratio"].to_numpy(), full["truth_ratio"].to_numpy())
    np.testing.assert_array_equal(fast["probability"].to_numpy(), full["probability"].to_numpy())

    summary = stages.unlearn(config, trained_small["data"], trained_small["target"], None, tmp_path / "fq",
                             progress=False, reference_items_path=reference_items)
    trajectory = pd.read_parquet(tmp_path / "fq" / "trajectory.parquet")
    assert trajectory["forget_quality"].notna().all() and trajectory["forget_truth_ratio"].notna().all()
    evaluation = stages.evaluate(config, trained_small["data"], tmp_path / "fq", tmp_path / "eval",
                                 reference_items_path=reference_items)
    assert evaluation["forget_quality"] == pytest.approx(summary["stop_value"], rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_keeps_its_checks(trained_small, reference_items, tmp_path):
    """Interrupted after a checkpoint, then resumed: the same trajectory and model as one run."""
    from simu_core import stages

    stop = ["unlearn.stop_at=forget_prob<=1e-9", "unlearn.eval_every=3", "unlearn.checkpoint_every=4"]
    whole = stages.unlearn(_config(*stop), trained_small["data"], trained_small["target"], None, tmp_path / "whole",
                           progress=False, reference_items_path=reference_items, checkpoint_dir=tmp_path / "c1")
    with pytest.raises(RuntimeError, match="injected fault"):
        stages.unlearn(_config(*stop, "run.fail_at_unlearn_step=11"), trained_small["data"], trained_small["target"],
                       None, tmp_path / "broken", progress=False, reference_items_path=reference_items,
                       checkpoint_dir=tmp_path / "c2")
    resumed = stages.unlearn(_config(*stop), trained_small["data"], trained_small["target"], None,
                             tmp_path / "resumed", progress=False, reference_items_path=reference_items,
                             checkpoint_dir=tmp_path / "c2")
    assert resumed["resumed_from"] == 8
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "whole" / "trajectory.parquet").drop(columns="seconds"),
        pd.read_parquet(tmp_path / "resumed" / "trajectory.parquet").drop(columns="seconds"))
    assert whole["stop_checks"] == resumed["stop_checks"]
    for name, tensor in _weights(tmp_path / "whole").items():
        assert torch.equal(tensor, _weights(tmp_path / "resumed")[name]), name


@pytest.mark.slow
def test_a_target_already_at_the_level_trains_nothing(trained_small, reference_items, tmp_path):
    from simu_core import stages

    summary = stages.unlearn(_config("unlearn.stop_at=forget_prob<=1.0"), trained_small["data"],
                             trained_small["target"], None, tmp_path / "start", progress=False,
                             reference_items_path=reference_items)
    assert summary["stop_status"] == "at_start" and summary["steps"] == 0 and summary["forget_loss_first"] is None
    target = _weights(trained_small["target"])
    for name, tensor in _weights(tmp_path / "start").items():
        assert torch.equal(tensor, target[name]), name


# ------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def stop_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop-pipeline")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}"], root


def _stop_flow(paths, *overrides):
    from flows.pipeline import simu_pipeline
    from test_pipeline import PIPELINE_OVERRIDES

    return simu_pipeline(overrides=PIPELINE_OVERRIDES + paths + ["unlearn.stop_at=forget_prob<=reference",
                                                                  "unlearn.eval_every=1", *overrides])


@pytest.mark.slow
def test_pipeline_stops_reports_and_keeps_the_trajectory(prefect_api, stop_workspace):
    from flows.cli import print_run_summary

    paths, root = stop_workspace
    summary = _stop_flow(paths)
    states = list(summary["states"])
    assert states.index("evaluate_reference") < states.index("unlearn")  # the level is read before unlearning
    outcome = summary["unlearning"]
    assert outcome["stop_level_source"] == "reference" and outcome["stop_checks"] >= 2
    run_dir = Path(summary["run_dir"])
    trajectory = pd.read_parquet(run_dir / "trajectory.parquet")
    assert trajectory["step"].iloc[-1] == outcome["stop_step"]
    row = pd.read_parquet(root / "results" / "runs.parquet").iloc[-1]
    assert row["stop.status"] == outcome["stop_status"] and row["stop.step"] == outcome["stop_step"]
    assert row["stop.value"] == pytest.approx(row["forget_prob"], rel=1e-5)  # the saved model is the one measured
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # not capsys: Prefect's console handler keeps the stream
        print_run_summary(summary)
    assert f"stop_at forget_prob<=reference (level {outcome['stop_level']:.4g}" in printed.getvalue()

    # eval_every beyond the budget: refused right after prepare_data, before any training.
    from simu_core.config import ConfigError

    with pytest.raises(ConfigError, match="unlearn.eval_every=9 is larger than the run's 3 optimizer steps"):
        _stop_flow([f"run.store={root / 'other-store'}", f"run.results={root / 'other-results'}"],
                   "unlearn.eval_every=9")
    assert not (root / "other-store" / "train_target").exists()


@pytest.mark.slow
def test_sequential_requests_stop_on_their_own_items(prefect_api, stop_workspace):
    paths, root = stop_workspace
    summary = _stop_flow(paths, "data.requests=2")
    assert "request2.evaluate_reference_request" in summary["states"]  # request 2's own items' level
    rows = pd.read_parquet(root / "results" / "runs.parquet")
    rows = rows[rows["kind"] == "request"]
    assert rows["stop.status"].notna().all() and len(rows) == 2
    assert (rows["stop.level_source"] == "reference").all()
