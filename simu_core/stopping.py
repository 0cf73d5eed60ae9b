"""Stop unlearning at a forgetting level: match methods by forgetting directly, not afterwards.

``unlearn.stop_at`` names a level on a forget measure, ``<measure><comparison><level>``:

- ``forget_prob<=reference``: the forget answer probability (mean over the forget items, as the
  evaluation's ``forget_prob``) reaches the retain reference's, read from the reference's cached
  evaluation of the same items;
- ``forget_prob<=0.15``: a number instead;
- ``forget_quality>=0.05``: forget quality (the KS-test p-value of the forget truth ratios against
  the retain reference's) reaches a p-value. ``forget_quality>=reference`` is refused: the
  reference's own forget quality is 1 by definition, which no unlearned model reaches.

Every ``unlearn.eval_every`` optimizer steps (and before the first, and after the last; sooner
near the level: :meth:`ForgetMonitor.next_check`) the :class:`ForgetMonitor` measures, with the
evaluation suite's own scoring code and the model in eval mode, the forget measure on the forget items the evaluation measures and the retain
probability on a fixed retain sample (the first ``unlearn.stop_retain_items`` items of the
evaluation's ``retain_eval`` split). Training stops at the first check that reaches the level;
that model is the stage's output. The outcome (:meth:`ForgetMonitor.outcome`):

- ``matched``: reached, within ``unlearn.stop_tolerance`` (relative) of the level;
- ``overshot``: reached, but further past the level than the tolerance (too large an lr, or checks
  too far apart): not counted as matched;
- ``not_reached``: the budget (``epochs`` / ``max_steps``) ended first: the last model is kept;
- ``at_start``: the model before unlearning already satisfies the level (nothing is trained).

With ``unlearn.stop_refine`` = k > 0, the check that reaches the level is refined
(:meth:`ForgetMonitor.refine`): the model one step before it is measured (unless the check before
already was), and when that one has not reached the level, the last optimizer step is bisected k
times: the stop step's update is applied with a fraction ``f`` of its size (the step taken with ``f``
times its lr, same gradients and optimizer state), and the run keeps the smallest fraction found that
reaches the level (to 2^-k of a step; the tolerance only decides whether it counts as matched, so it
does not change the model). When the model one step before already reached the level, the crossing
lies further back than the refinement looks: that model, the nearer one, is kept. Where one step moves the
measure by more than the tolerance (TOFU's forget probability near the reference's: a third per step
at the lrs of docs/results.md), this is the only way to stop within it short of a much smaller lr. The
trajectory's ``fraction`` column says which model each check measured: ``step - 1 + fraction`` steps
of training (1 for every ordinary check).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import torch

from simu_core.evaluation.qa import answer_probabilities, forget_answer_scores
from simu_core.metrics import tofu
from simu_core.stop_rule import REFERENCE, STOP_MEASURES, StopRule, parse_stop_at

__all__ = ["ForgetMonitor", "REFERENCE", "STATUSES", "STOP_MEASURES", "StopRule", "SuiteMonitor", "TRAJECTORY_COLUMNS",
           "budget_steps", "format_outcome", "parse_stop_at"]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from simu_core.config import EvalConfig

STATUSES = ("matched", "overshot", "not_reached", "at_start")
TRAJECTORY_COLUMNS = ("step", "fraction", "forget_prob", "forget_quality", "forget_truth_ratio", "retain_prob",
                      "lr", "seconds", "reached")
#: Share of the extrapolated steps to the level after which the next check runs (simulated on per-step
#: trajectories of SIMU, SO- and FO-GradDiff on the testbed preset: with eval_every 10 the stop lands
#: within 1-7 % of the level where a step moves the measure by less than that, in 5-7 checks).
REFINE_FACTOR = 0.5


def training_position(row: dict[str, Any]) -> float:
    """Steps of training behind a check's model: ``step - 1 + fraction`` (the step itself unless refined)."""
    return int(row["step"]) - 1 + float(row["fraction"])


def budget_steps(forget_items: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of an unlearning run over ``forget_items``: the trainer's own batch plan, counted."""
    from simu_core.unlearning.trainer import plan_batches

    return len(plan_batches(forget_items, 0, batch_size, grad_accum, epochs, max_steps, seed=0))


def _measured_reference(reference_items: pd.DataFrame, forget: pd.DataFrame) -> pd.DataFrame:
    """The retain reference's rows of exactly the forget items measured here, in their order."""
    reference_forget = reference_items[reference_items["split"] == "forget"]
    reference_forget = reference_forget.set_index(reference_forget["item_id"].astype(str))
    wanted = forget["item_id"].astype(str)
    missing = set(wanted) - set(reference_forget.index)
    if missing:
        raise ValueError(f"the retain reference's evaluation lacks {len(missing)} of the forget items measured here "
                         f"(e.g. {sorted(missing)[:3]}): evaluate both with the same data and eval.max_items")
    return reference_forget.loc[wanted]


class ForgetMonitor:
    """Measures the forget measure and the retain probability during unlearning; decides when to stop.

    ``forget`` / ``retain``: the evaluation splits' frames (``forget`` and ``retain_eval`` as
    :func:`~simu_core.evaluation.qa.evaluation_splits` returns them); ``reference_items``: the retain
    reference's items table (forget quality, and the ``reference`` level).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        forget: pd.DataFrame,
        retain: pd.DataFrame,
        rule: StopRule,
        eval_config: EvalConfig,
        *,
        eval_every: int,
        tolerance: float,
        max_length: int,
        reference_items: pd.DataFrame | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.forget, self.retain = forget, retain
        self.rule, self.eval_config = rule, eval_config
        self.eval_every, self.tolerance, self.max_length = eval_every, tolerance, max_length
        measured = _measured_reference(reference_items, forget) if reference_items is not None else None
        if rule.level is not None:
            self.level, self.level_source = rule.level, "value"
        elif measured is None:
            raise ValueError(f"unlearn.stop_at={rule.text()!r} needs the retain reference's evaluation (its items table)")
        else:  # the reference's forget probability over exactly the items measured here
            self.level, self.level_source = float(measured["probability"].mean()), REFERENCE
        self.reference_truth_ratios = None if measured is None else measured["truth_ratio"].to_numpy(dtype=float)
        if rule.measure == "forget_quality" and self.reference_truth_ratios is None:
            raise ValueError("unlearn.stop_at on forget_quality needs the retain reference's truth ratios")
        self.rows: list[dict[str, Any]] = []
        self.columns = TRAJECTORY_COLUMNS
        self.chosen: int | None = None  # the row whose model the run keeps, once refined

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a check runs after ``step``: :meth:`next_check` and after the last step."""
        return step == self.next_check() or step == total_steps

    def next_check(self) -> int:
        """The step of the next check: ``eval_every`` steps after the last one, or sooner when the last
        two checks, extrapolated linearly in log10 of the measure, reach the level sooner: then after
        :data:`REFINE_FACTOR` of the predicted steps (at least one), because forgetting accelerates and a
        straight line predicts the crossing late. A check then lands near the level instead of up to
        ``eval_every`` steps past it, for a few extra checks around the crossing only."""
        if not self.rows:
            return 0
        last = self.rows[-1]
        regular = int(last["step"]) + self.eval_every
        if len(self.rows) < 2:
            return regular
        before = self.rows[-2]
        measure = self.rule.measure
        values = [float(row[measure]) for row in (before, last)]
        if not all(math.isfinite(v) and v > 0 for v in values) or self.level <= 0:
            return regular
        slope = (math.log10(values[1]) - math.log10(values[0])) / (int(last["step"]) - int(before["step"]))
        remaining = math.log10(self.level) - math.log10(values[1])
        toward = slope < 0 if self.rule.comparison == "<=" else slope > 0
        if not toward:
            return regular
        return int(last["step"]) + max(1, min(self.eval_every, math.ceil(REFINE_FACTOR * remaining / slope)))

    def measure(self) -> dict[str, float]:
        """The forget and retain measures of the model as it is now (eval mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                forget_prob = forget_quality = forget_truth_ratio = float("nan")
                if self.rule.measure == "forget_quality":  # truth ratios: both forget measures
                    items = forget_answer_scores(self.model, self.tokenizer, self.forget, self.eval_config,
                                                 max_length=self.max_length)
                    ratios = items["truth_ratio"].to_numpy(dtype=float)
                    forget_prob = float(items["probability"].mean())
                    forget_quality = tofu.forget_quality(ratios, self.reference_truth_ratios)
                    forget_truth_ratio = tofu.truth_ratio_score_forget(ratios)
                else:
                    forget_prob = float(np.mean(answer_probabilities(
                        self.model, self.tokenizer, self.forget, self.eval_config, max_length=self.max_length)))
                retain_prob = float(np.mean(answer_probabilities(
                    self.model, self.tokenizer, self.retain, self.eval_config, max_length=self.max_length)))
        finally:
            self.model.train(was_training)
        return {"forget_prob": forget_prob, "forget_quality": forget_quality,
                "forget_truth_ratio": forget_truth_ratio, "retain_prob": retain_prob}

    def check(self, step: int, lr: float, fraction: float = 1.0) -> bool:
        """Measure after ``step`` (0: before unlearning; ``fraction`` < 1: with that share of the step's
        update), record the check; True when the level is reached."""
        started = time.perf_counter()
        values = self.measure()
        reached = self.rule.reached(values[self.rule.measure], self.level)
        self.rows.append({"step": step, "fraction": float(fraction), **values, "lr": float(lr),
                          "seconds": time.perf_counter() - started, "reached": reached})
        return reached

    def refine(self, step: int, lr: float, apply_fraction: Callable[[float], None], halvings: int) -> None:
        """After the check of ``step`` reached the level: find where on the way there it was crossed
        (see the module's docstring). ``apply_fraction(f)`` sets the model to the one before ``step``
        plus ``f`` times the step's update (0: before it, 1: after it). Leaves the model at the kept
        fraction and records every check made; :meth:`outcome` reads the kept one."""
        last = self.rows[-1]
        if step <= 0 or not last["reached"] or last["step"] != step or halvings < 1:
            return
        self.chosen = len(self.rows) - 1
        if len(self.rows) < 2 or int(self.rows[-2]["step"]) != step - 1:
            apply_fraction(0.0)  # the model after step - 1, which no check measured
            if self.check(step - 1, lr):
                self.chosen = len(self.rows) - 1  # the crossing is earlier still: the nearer model, kept
                return
        low, high = 0.0, 1.0
        for _ in range(halvings):
            middle = (low + high) / 2
            apply_fraction(middle)
            if self.check(step, lr, fraction=middle):
                high, self.chosen = middle, len(self.rows) - 1
            else:
                low = middle
        apply_fraction(high)

    def trajectory(self) -> pd.DataFrame:
        """Every check in order of training (``step - 1 + fraction``: a refinement's checks come before the
        check they refine): :data:`TRAJECTORY_COLUMNS` (a :class:`SuiteMonitor`: its own)."""
        order = sorted(range(len(self.rows)), key=lambda index: training_position(self.rows[index]))
        return pd.DataFrame([self.rows[index] for index in order], columns=list(self.columns))

    def state(self) -> dict[str, list]:
        """The checks so far as plain lists (saved in the trainer's checkpoints)."""
        return {column: [row[column] for row in self.rows] for column in self.columns}

    def load_state(self, state: dict[str, list]) -> None:
        """Restore the checks a checkpoint saved."""
        count = len(state["step"])
        # Checkpoints written before refinement existed hold whole steps only.
        defaults = {"fraction": [1.0] * count}
        self.rows = [{column: state.get(column, defaults.get(column))[i] for column in self.columns}
                     for i in range(count)]

    def outcome(self, budget_steps: int) -> dict[str, Any]:
        """Where the run stopped and why (the ``stop_*`` figures of the stage's summary)."""
        if not self.rows:
            raise ValueError("no check was made")
        reached = [index for index, row in enumerate(self.rows) if row["reached"]]
        index = self.chosen if self.chosen is not None else reached[0] if reached else len(self.rows) - 1
        row = self.rows[index]
        value = float(row[self.rule.measure])
        if not reached:
            status = "not_reached"
        elif row["step"] == 0:
            status = "at_start"
        else:
            status = "matched" if self.rule.within(value, self.level, self.tolerance) else "overshot"
        # The check before: the nearest model on the way there that had not reached the level.
        before = [r for r in self.rows if training_position(r) < training_position(row) and not r["reached"]]
        previous = max(before, key=training_position) if before else None
        return {
            "stop_rule": self.rule.text(),
            "stop_measure": self.rule.measure,
            "stop_level": self.level,
            "stop_level_source": self.level_source,
            "stop_tolerance": self.tolerance,
            "stop_status": status,
            "stop_matched": status == "matched",
            "stop_step": int(row["step"]),
            "stop_fraction": float(row["fraction"]),
            "stop_refine_checks": len(self.rows) - 1 - (reached[0] if reached else len(self.rows) - 1),
            "stop_budget_steps": int(budget_steps),
            "stop_value": value,
            "stop_retain_prob": float(row.get("retain_prob", math.nan)),
            "stop_first_check": bool(reached) and reached[0] == 1,
            "stop_previous_step": int(previous["step"]) if previous is not None else None,
            "stop_previous_fraction": float(previous["fraction"]) if previous is not None else None,
            "stop_previous_value": float(previous[self.rule.measure]) if previous is not None else None,
            "stop_checks": len(self.rows),
            "stop_check_seconds": float(sum(r["seconds"] for r in self.rows)),
        }


class SuiteMonitor(ForgetMonitor):
    """The checks of ``unlearn.stop_at`` on a benchmark whose forget measure is not the TOFU suite's
    (MUSE's VerbMem or KnowMem, WMDP's accuracy): ``measure_fn(model)`` returns the stop measure and
    any retain measure, computed with the benchmark's own evaluation code; the level is a number or
    the retain reference's value of the measure on the same items (``reference_level``). The
    schedule of checks, the stop and the outcome are :class:`ForgetMonitor`'s.
    """

    def __init__(self, model: torch.nn.Module, rule: StopRule, measure_fn: Any, measures: tuple[str, ...], *,
                 eval_every: int, tolerance: float, reference_level: float | None = None) -> None:
        self.model, self.rule, self.measure_fn = model, rule, measure_fn
        self.eval_every, self.tolerance = eval_every, tolerance
        if rule.level is not None:
            self.level, self.level_source = rule.level, "value"
        elif reference_level is None:
            raise ValueError(f"unlearn.stop_at={rule.text()!r} needs the retain reference's {rule.measure}")
        else:
            self.level, self.level_source = float(reference_level), REFERENCE
        self.rows = []
        self.chosen = None
        self.columns = ("step", "fraction", *measures, "lr", "seconds", "reached")

    def measure(self) -> dict[str, float]:
        """The measures of the model as it is now (eval mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return {name: float(value) for name, value in self.measure_fn(self.model).items()}
        finally:
            self.model.train(was_training)


def format_outcome(outcome: dict[str, Any]) -> str:
    """One line for the printout: where the run stopped, the value reached and the check before."""
    measure, level = outcome["stop_measure"], outcome["stop_level"]
    source = "the retain reference's" if outcome["stop_level_source"] == REFERENCE else "given"
    head = (f"stop_at {outcome['stop_rule']} (level {level:.4g}, {source}): ")
    previous = ""
    if outcome.get("stop_previous_step") is not None:
        before = outcome.get("stop_previous_fraction")
        share = f" ({before:.3g} of its update)" if before is not None and before < 1 else ""
        previous = (f"; check before: step {outcome['stop_previous_step']}{share}, "
                    f"{outcome['stop_previous_value']:.4g}")
    fraction = outcome.get("stop_fraction", 1.0)
    partial = f" ({fraction:.3g} of its update, refined)" if fraction is not None and fraction < 1 else ""
    where = (f"step {outcome['stop_step']}{partial} of {outcome['stop_budget_steps']}, "
             f"{measure} {outcome['stop_value']:.4g}")
    tolerance = f"{100 * outcome['stop_tolerance']:g} %"
    status = outcome["stop_status"]
    if status == "matched":
        verdict = f"stopped at {where}{previous}: matched (within {tolerance} of the level)"
    elif status == "overshot":
        cause = ("already past it at the first check: too large an lr, or a smaller unlearn.eval_every"
                 if outcome.get("stop_first_check") else "past it by more than the tolerance between two checks "
                 "(a smaller lr, or unlearn.stop_refine to bisect the last step)")
        verdict = f"stopped at {where}{previous}: NOT matched, {cause} ({tolerance})"
    elif status == "not_reached":
        verdict = f"budget ended at {where}: NOT matched, the level was never reached (larger lr or budget)"
    else:
        verdict = f"the model before unlearning already reaches the level ({measure} {outcome['stop_value']:.4g}): " \
                  "nothing was trained"
    return head + verdict
