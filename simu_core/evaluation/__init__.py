"""Model-side evaluation: batched scoring and generation, the TOFU and LUME suites.

Metric definitions live in :mod:`simu_core.metrics` (pure functions); this package runs the model
to produce their per-item inputs and assembles the per-item and aggregate tables (metric names in
:mod:`simu_core.evaluation.results`).
"""

from simu_core.evaluation.generation import cut_at_eos, eos_token_ids, generate_greedy
from simu_core.evaluation.lume import LUME_MAX_NEW_TOKENS, evaluate_lume, validate_lume
from simu_core.evaluation.mmlu import MMLUFormatError, evaluate_mmlu, load_mmlu, mmlu_prompt
from simu_core.evaluation.qa import QA_SPLITS, TOFU_MAX_NEW_TOKENS, evaluate_qa, evaluation_splits, mia_aucs
from simu_core.evaluation.results import (
    HEADLINE_SPLIT,
    LUME_HEADLINE_METRICS,
    METRIC_COLUMNS,
    QA_HEADLINE_METRICS,
    EvaluationResult,
)
from simu_core.evaluation.scoring import ScoredExamples, score_examples

__all__ = [
    "HEADLINE_SPLIT",
    "LUME_HEADLINE_METRICS",
    "LUME_MAX_NEW_TOKENS",
    "METRIC_COLUMNS",
    "MMLUFormatError",
    "QA_HEADLINE_METRICS",
    "QA_SPLITS",
    "TOFU_MAX_NEW_TOKENS",
    "EvaluationResult",
    "ScoredExamples",
    "cut_at_eos",
    "eos_token_ids",
    "evaluate_lume",
    "evaluate_mmlu",
    "evaluate_qa",
    "evaluation_splits",
    "generate_greedy",
    "load_mmlu",
    "mia_aucs",
    "mmlu_prompt",
    "score_examples",
    "validate_lume",
]
