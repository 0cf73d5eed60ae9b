"""Each benchmark's evaluation suite, and what ``unlearn.stop_at`` measures on it.

A row per benchmark of :data:`SUITES`: ``evaluate(model, tokenizer, benchmark, config,
reference_items, light, tiny)`` returns the suite's
:class:`~simu_core.evaluation.results.EvaluationResult`; ``stop_checks(benchmark, config, tokenizer,
tiny, measure)`` (None: the TOFU suite's :class:`~simu_core.stopping.ForgetMonitor`, or no stop
measure) what a :class:`~simu_core.stopping.SuiteMonitor` measures where the forget measure is the
benchmark's own (MUSE's VerbMem / KnowMem, WMDP's accuracy). What an attack measures is in
:mod:`simu_core.benchmarks.attack_measures` (its own table, so that the evaluation's and unlearning's
code versions do not hold the attacks' code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from simu_core.benchmarks.info import role_table, table_row

if TYPE_CHECKING:
    from simu_core.config import SimuConfig
    from simu_core.evaluation.results import EvaluationResult


@dataclass(frozen=True)
class StopChecks:
    """What a :class:`~simu_core.stopping.SuiteMonitor` measures: ``measure(model)`` gives every
    measure in ``measures`` (the stop measure first) on the items the evaluation measures;
    ``reference_level(reference_items)`` the retain reference's value of the stop measure on the
    same items, from its evaluation's items table."""

    measures: tuple[str, ...]
    measure: Callable[[Any], dict[str, float]]
    reference_level: Callable[[pd.DataFrame], float]


@dataclass(frozen=True)
class Suite:
    """One benchmark's evaluation and stop checks (module docstring)."""

    evaluate: Callable[..., EvaluationResult]
    stop_checks: Callable[..., StopChecks] | None = None


def _evaluate_qa(model, tokenizer, benchmark, config: SimuConfig, reference_items: pd.DataFrame | None,
                 light: bool, tiny: bool) -> EvaluationResult:
    from simu_core.evaluation import evaluate_qa

    return evaluate_qa(model, tokenizer, benchmark, config.eval, reference_items, max_length=config.model.max_length,
                       light=light)


def _evaluate_lume(model, tokenizer, benchmark, config: SimuConfig, reference_items: pd.DataFrame | None,
                   light: bool, tiny: bool) -> EvaluationResult:
    from simu_core.evaluation import evaluate_lume

    return evaluate_lume(model, tokenizer, benchmark, config.eval, config.eval.mmlu_source,
                         max_length=config.model.max_length)


def reference_privleak_auc(reference_items: pd.DataFrame | None) -> float | None:
    """The retain reference's PrivLeak AUC from its MUSE items table (Min-K% of the forget members
    against the holdout non-members, as the reference's own evaluation scored them)."""
    from simu_core.metrics.muse import privleak_auc

    if reference_items is None:
        return None
    rows = reference_items[reference_items["kind"] == "privleak"]
    forget, holdout = rows[rows["split"] == "forget"], rows[rows["split"] == "holdout"]
    if forget.empty or holdout.empty:
        raise ValueError("the retain reference's MUSE items hold no PrivLeak scores (kind 'privleak', splits "
                         "'forget' and 'holdout'): evaluate it with the same data")
    return privleak_auc(forget["score"].to_numpy(dtype=float), holdout["score"].to_numpy(dtype=float))


def _evaluate_muse(model, tokenizer, benchmark, config: SimuConfig, reference_items: pd.DataFrame | None,
                   light: bool, tiny: bool) -> EvaluationResult:
    from simu_core.evaluation.muse import evaluate_muse

    # MUSE truncates nothing; the tiny model has no positions past model.max_length.
    evaluation = evaluate_muse(model, tokenizer, benchmark, reference_privleak_auc(reference_items),
                               max_items=config.eval.max_items, batch_size=config.eval.batch_size,
                               max_length=config.model.max_length if tiny else None)
    return evaluation.to_result()


def muse_measures(benchmark, config: SimuConfig, tokenizer, tiny: bool):
    """``measure(model, parts)`` -> ``{part: per-item table}`` for the parts 'verbmem_forget',
    'knowmem_forget', 'knowmem_retain', on the items the evaluation measures (``eval.max_items``),
    with the evaluation's own VerbMem / KnowMem code."""
    from simu_core.evaluation.muse import knowmem_table, verbmem_table

    head = (lambda frame: frame.head(config.eval.max_items)) if config.eval.max_items else (lambda frame: frame)
    batch, length = config.eval.batch_size, config.model.max_length if tiny else None

    def measure(model, parts: tuple[str, ...]) -> dict[str, pd.DataFrame]:
        tables = {}
        for part in parts:
            if part == "verbmem_forget":
                tables[part] = verbmem_table(model, tokenizer, head(benchmark.verbmem_forget), batch, length).assign(
                    kind="verbmem", split="forget")
            else:
                split = part.removeprefix("knowmem_")
                rows, examples = ((benchmark.knowmem_forget, benchmark.knowmem_forget_icl) if split == "forget"
                                  else (benchmark.knowmem_retain, benchmark.knowmem_retain_icl))
                tables[part] = knowmem_table(model, tokenizer, head(rows), examples, split, batch, length).assign(
                    kind="knowmem")
        return tables

    return measure


def _muse_stop_checks(benchmark, config: SimuConfig, tokenizer, tiny: bool, measure: str) -> StopChecks:
    """VerbMem or KnowMem on the forget items the evaluation measures (``eval.max_items``), and
    KnowMem on the retain questions (MUSE's utility), with the evaluation's own code."""
    tables = muse_measures(benchmark, config, tokenizer, tiny)

    def measure_fn(model) -> dict[str, float]:
        return {part: float(table["rougeL_f1"].mean())
                for part, table in tables(model, (measure, "knowmem_retain")).items()}

    kind = "verbmem" if measure == "verbmem_forget" else "knowmem"

    def reference_level(reference_items: pd.DataFrame) -> float:
        rows = reference_items[(reference_items["kind"] == kind) & (reference_items["split"] == "forget")]
        if rows.empty:
            raise ValueError(f"the retain reference's MUSE items hold no {kind} forget scores: evaluate it with the "
                             "same data")
        return float(rows["score"].mean())

    return StopChecks((measure, "knowmem_retain"), measure_fn, reference_level)


def _wmdp_stop_checks(benchmark, config: SimuConfig, tokenizer, tiny: bool, measure: str) -> StopChecks:
    """WMDP accuracy on the questions the evaluation measures (``eval.max_items``); no retain measure
    (MMLU is read by the evaluation, not at every check)."""
    from simu_core.evaluation.wmdp import evaluate_wmdp, wmdp_accuracy

    def measure_fn(model) -> dict[str, float]:
        items = evaluate_wmdp(model, tokenizer, benchmark, max_items=config.eval.max_items,
                              batch_size=config.eval.batch_size, max_length=config.model.max_length)
        return {measure: wmdp_accuracy(items)}

    def reference_level(reference_items: pd.DataFrame) -> float:
        raise ValueError("WMDP has no retain reference level: give unlearn.stop_at a number, e.g. wmdp_accuracy<=0.3")

    return StopChecks((measure,), measure_fn, reference_level)


def _evaluate_wmdp(model, tokenizer, benchmark, config: SimuConfig, reference_items: pd.DataFrame | None,
                   light: bool, tiny: bool) -> EvaluationResult:
    from simu_core.evaluation.wmdp import wmdp_result

    return wmdp_result(model, tokenizer, benchmark, config.eval, max_length=config.model.max_length)


SUITES: dict[str, Suite] = role_table({
    "synthetic": Suite(_evaluate_qa),
    "tofu": Suite(_evaluate_qa),
    "lume": Suite(_evaluate_lume),
    "muse": Suite(_evaluate_muse, _muse_stop_checks),
    "wmdp": Suite(_evaluate_wmdp, _wmdp_stop_checks),
}, "suites")


def benchmark_suite(name: str) -> Suite:
    """The evaluation suite of ``name``; a ValueError names the known benchmarks."""
    return table_row(SUITES, name)
