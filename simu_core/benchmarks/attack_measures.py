"""What an attack measures on each benchmark, before and after it: one row per benchmark.

``ATTACK_MEASURES[name](benchmark, config, tokenizer, tiny)`` (None: no attack applies) returns
``measure(model) -> (items, figures)``: the per-item scores (a ``split`` column among others) and the
figures of the registry row's ``attack_measures``, computed with the benchmark's own evaluation code.
A table of its own (not a field of :mod:`~simu_core.benchmarks.suites`), so that the code versions of
evaluation and unlearning, which read the suites, do not hold the attacks' code; only the quantization
stage reads it (the other attacks are TOFU-suite attacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from simu_core.benchmarks.info import benchmark_info, role_table, table_row
from simu_core.benchmarks.suites import muse_measures

if TYPE_CHECKING:
    from simu_core.config import SimuConfig

Measure = Callable[[Any], tuple[pd.DataFrame, dict[str, float]]]


def _qa_attack_measure(benchmark, config: SimuConfig, tokenizer, tiny: bool):
    """Forget probability, ROUGE and truth-ratio score on the evaluation's forget items, retain
    probability and ROUGE on the first ``attack.retain_items`` retain items (the TOFU suite's scoring)."""
    from simu_core.attacks.measures import measured_splits, score, summarise

    splits = measured_splits(benchmark, config, retain=True)

    def measure(model) -> tuple[pd.DataFrame, dict[str, float]]:
        items = score(model, tokenizer, splits, config.eval, config.model.max_length)
        return items, summarise(items)

    return measure


#: Columns of a MUSE attack's per-item table.
MUSE_ATTACK_COLUMNS = ("kind", "split", "item_id", "generation", "rougeL_f1")


def _muse_attack_measure(benchmark, config: SimuConfig, tokenizer, tiny: bool):
    """VerbMem and KnowMem on forget, KnowMem on retain (MUSE's utility): the MUSE evaluation's code on
    its items (``eval.max_items``). PrivLeak is left out: it needs the retain reference's AUC after the
    same attack, and the attacks measure one model each."""
    tables = muse_measures(benchmark, config, tokenizer, tiny)
    parts = benchmark_info("muse").attack_measures

    def measure(model) -> tuple[pd.DataFrame, dict[str, float]]:
        measured = tables(model, parts)
        items = pd.concat([table[list(MUSE_ATTACK_COLUMNS)] for table in measured.values()], ignore_index=True)
        return items, {part: float(table["rougeL_f1"].mean()) for part, table in measured.items()}

    return measure


def _wmdp_attack_measure(benchmark, config: SimuConfig, tokenizer, tiny: bool):
    """WMDP accuracy on the evaluation's questions and, with ``eval.mmlu_source``, MMLU accuracy: the
    WMDP evaluation itself (:func:`~simu_core.evaluation.wmdp.wmdp_result`)."""
    from simu_core.evaluation.wmdp import wmdp_result

    def measure(model) -> tuple[pd.DataFrame, dict[str, float]]:
        result = wmdp_result(model, tokenizer, benchmark, config.eval, max_length=config.model.max_length)
        headline = result.headline()
        return result.items, {name: headline[name] for name in ("wmdp_accuracy", "mmlu") if name in headline}

    return measure


ATTACK_MEASURES: dict[str, Callable[..., Measure] | None] = role_table({
    "synthetic": _qa_attack_measure,
    "tofu": _qa_attack_measure,
    "lume": None,
    "muse": _muse_attack_measure,
    "wmdp": _wmdp_attack_measure,
}, "attack measures")


def attack_measure(benchmark, config: SimuConfig, tokenizer) -> Measure:
    """``measure(model) -> (items, figures)``: the benchmark's attack measures on the items its
    evaluation reads; a ValueError for a benchmark no attack applies to."""
    factory = table_row(ATTACK_MEASURES, config.data.benchmark)
    if factory is None:
        raise ValueError(f"no attack is offered on {benchmark_info(config.data.benchmark).short}")
    return factory(benchmark, config, tokenizer, config.builds_tiny_model())
