"""TOFU metrics (open-unlearning definitions), as pure functions of per-item model outputs.

Inputs are per-item numbers produced elsewhere by the model: the mean answer-token NLL of each item
(``avg_loss`` in open-unlearning logs), NLL matrices for perturbed answers, per-token argmax-match
booleans, and MIA AUCs. See ``shared/reference/metrics.md`` for the definitions.

open-unlearning adds ``1e-10`` to a few denominators (``wrong / (right + 1e-10)`` in the truth ratio
and ``right / (right + wrong + 1e-10)`` in the option-normalised probability). metrics.md states the
exact formulas; these functions follow metrics.md by default (``eps=0.0``) and reproduce the
open-unlearning logs bit-for-bit with ``eps=OPEN_UNLEARNING_EPS``. The difference is a relative
``eps / P(right)``: below 1e-6 except when the correct answer has probability below 1e-4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from ._validation import (
    as_bool_array,
    as_float_array,
    as_rows,
    check_in_range,
    check_same_length,
    check_scalar,
)

#: The constant open-unlearning adds to denominators (truth ratio, normalised probability).
OPEN_UNLEARNING_EPS = 1e-10

#: The nine Model Utility components: {Probability, ROUGE, truth-ratio score} x
#: {retain_perturbed, real_authors_perturbed, world_facts_perturbed}.
MODEL_UTILITY_COMPONENTS = (
    "retain_prob",
    "retain_rouge",
    "retain_truth_ratio",
    "ra_prob",
    "ra_rouge",
    "ra_truth_ratio",
    "wf_prob",
    "wf_rouge",
    "wf_truth_ratio",
)


def _nll_array(nll: ArrayLike, name: str) -> np.ndarray:
    arr = as_float_array(nll, name)
    check_in_range(arr, name, lo=0.0)
    return arr


def _nll_rows(nll: ArrayLike | Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    rows = as_rows(nll, name)
    for i, row in enumerate(rows):
        bad = np.flatnonzero(row < 0)
        if bad.size:
            raise ValueError(f"{name} must be >= 0 (an NLL), got {row[bad[0]]!r} at index [{i}, {int(bad[0])}]")
    return rows


def _check_eps(eps: float) -> float:
    return check_scalar(eps, "eps", lo=0.0)


def probability_from_nll(nll: ArrayLike) -> np.ndarray:
    """Per-item length-normalised probability ``exp(-nll)`` from per-item mean answer-token NLLs."""
    return np.exp(-_nll_array(nll, "nll"))


def mean_probability(nll: ArrayLike) -> float:
    """TOFU 'Probability' on forget/retain splits: mean over items of ``exp(-nll)``."""
    return float(np.mean(probability_from_nll(nll)))


def normalised_probability(
    nll_right: ArrayLike,
    nll_wrong_matrix: ArrayLike | Sequence[Sequence[float]],
    *,
    eps: float = 0.0,
) -> np.ndarray:
    """Per-item multiple-choice probability ``P(a) / (P(a) + sum_j P(wrong_j))`` (real authors, world facts).

    Each option's probability is length-normalised separately: ``P = exp(-mean token NLL)``.
    ``nll_right``: shape (n,); ``nll_wrong_matrix``: n rows of perturbed-answer NLLs (may be ragged).
    ``eps`` is added to the denominator (open-unlearning uses ``OPEN_UNLEARNING_EPS``).
    """
    right = _nll_array(nll_right, "nll_right")
    wrong = _nll_rows(nll_wrong_matrix, "nll_wrong_matrix")
    check_same_length(right, "nll_right", wrong, "nll_wrong_matrix")
    eps = _check_eps(eps)
    out = np.empty(len(right))
    for i, (r, w) in enumerate(zip(right, wrong)):
        if eps == 0.0:
            # 1 / (1 + sum_j exp(r - w_j)), computed in log space to avoid underflow of tiny P.
            out[i] = np.exp(-np.logaddexp(0.0, float(np.logaddexp.reduce(r - w))))
        else:
            p_right = np.exp(-r)
            out[i] = p_right / (p_right + float(np.sum(np.exp(-w))) + eps)
    return out


def mean_normalised_probability(
    nll_right: ArrayLike,
    nll_wrong_matrix: ArrayLike | Sequence[Sequence[float]],
    *,
    eps: float = 0.0,
) -> float:
    """TOFU 'Probability' on real authors / world facts: mean of :func:`normalised_probability`."""
    return float(np.mean(normalised_probability(nll_right, nll_wrong_matrix, eps=eps)))


def truth_ratio(
    nll_right: ArrayLike,
    nll_wrong_matrix: ArrayLike | Sequence[Sequence[float]],
    *,
    eps: float = 0.0,
) -> np.ndarray:
    """Per-item truth ratio ``R = geomean_j P(wrong_j) / P(right) = exp(nll_right - mean_j nll_wrong_j)``.

    "right" is the paraphrased answer on forget/retain and the answer on real authors / world facts.
    ``nll_right``: shape (n,); ``nll_wrong_matrix``: n rows of perturbed-answer NLLs (may be ragged).
    With ``eps > 0`` computes ``exp(-mean_j nll_wrong_j) / (exp(-nll_right) + eps)`` (open-unlearning).
    """
    right = _nll_array(nll_right, "nll_right")
    wrong = _nll_rows(nll_wrong_matrix, "nll_wrong_matrix")
    check_same_length(right, "nll_right", wrong, "nll_wrong_matrix")
    eps = _check_eps(eps)
    mean_wrong = np.array([float(np.mean(w)) for w in wrong])
    with np.errstate(over="ignore"):
        if eps == 0.0:
            ratios = np.exp(right - mean_wrong)
        else:
            ratios = np.exp(-mean_wrong) / (np.exp(-right) + eps)
    bad = np.flatnonzero(~np.isfinite(ratios))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"truth ratio overflows at index {i} (nll_right={right[i]!r}, mean nll_wrong={mean_wrong[i]!r})"
        )
    return ratios


def _ratio_array(ratios: ArrayLike, name: str) -> np.ndarray:
    arr = as_float_array(ratios, name)
    check_in_range(arr, name, lo=0.0)
    return arr


def truth_ratio_score_forget(ratios: ArrayLike) -> float:
    """Forget-set truth-ratio score: mean over items of ``min(R, 1/R)`` (1 = right and wrong equally likely)."""
    r = _ratio_array(ratios, "ratios")
    zero = np.flatnonzero(r == 0)
    if zero.size:
        raise ValueError(f"ratios must be > 0 for min(R, 1/R), got 0 at index {int(zero[0])}")
    return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_score_true_better(ratios: ArrayLike) -> float:
    """Retain / real-authors / world-facts truth-ratio score: mean over items of ``max(0, 1 - R)``."""
    r = _ratio_array(ratios, "ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_truth_ratios: ArrayLike, retain_truth_ratios: ArrayLike) -> float:
    """Forget Quality: p-value of ``scipy.stats.ks_2samp`` between per-item forget-split truth ratios
    of the unlearned model and of the retain-only model (1.0 for identical distributions)."""
    a = as_float_array(unlearned_truth_ratios, "unlearned_truth_ratios")
    b = as_float_array(retain_truth_ratios, "retain_truth_ratios")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Mapping[str, float]) -> float:
    """Model Utility: harmonic mean (``scipy.stats.hmean``) of the nine :data:`MODEL_UTILITY_COMPONENTS`.

    Every component must be present (no extras), finite and >= 0; any zero gives 0.
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping of component name -> float, got {type(values).__name__}")
    missing = [k for k in MODEL_UTILITY_COMPONENTS if k not in values]
    if missing:
        raise ValueError(f"model_utility: missing component(s) {missing}")
    extra = [k for k in values if k not in MODEL_UTILITY_COMPONENTS]
    if extra:
        raise ValueError(
            f"model_utility: unexpected component(s) {extra}; expected exactly {list(MODEL_UTILITY_COMPONENTS)}"
        )
    xs = [check_scalar(values[k], f"model_utility component {k!r}", lo=0.0) for k in MODEL_UTILITY_COMPONENTS]
    if any(x == 0.0 for x in xs):
        return 0.0
    return float(stats.hmean(xs))


def extraction_strength(matches: ArrayLike, *, match_open_unlearning: bool = False) -> float:
    """Per-item extraction strength ``1 - k*/T`` from per-answer-token argmax-match booleans.

    ``matches[t]`` is True when the model's argmax prediction equals label token t (T = len(matches)).
    k* is the smallest offset such that every token of the suffix ``matches[k*:]`` matches; per
    metrics.md k* may be T (empty suffix), so an item whose last token is mispredicted scores 0.
    open-unlearning's loop stops at k = T-1 and scores such an item 1/T instead; pass
    ``match_open_unlearning=True`` to reproduce that.
    """
    m = as_bool_array(matches, "matches")
    t = m.size
    mismatches = np.flatnonzero(~m)
    k_star = 0 if mismatches.size == 0 else int(mismatches[-1]) + 1
    if match_open_unlearning and k_star == t:
        k_star = t - 1
    return 1.0 - k_star / t


def exact_memorization(matches: ArrayLike) -> float:
    """Per-item exact memorization: fraction of answer tokens whose argmax prediction matches the label."""
    m = as_bool_array(matches, "matches")
    return float(np.mean(m))


def privleak(auc_model: float, auc_retain_model: float) -> float:
    """privleak = (s - r) / r * 100 with s = 1 - AUC_MinK(model), r = 1 - AUC_MinK(retain model).

    AUCs use the forget-labelled-0 convention of :func:`simu_core.metrics.mia.auc`. Ideal 0.
    (open-unlearning divides by ``r + 1e-10``: a relative difference below 1e-9 for r >= 0.1.)
    """
    a = check_scalar(auc_model, "auc_model", lo=0.0, hi=1.0)
    b = check_scalar(auc_retain_model, "auc_retain_model", lo=0.0, hi=1.0)
    s = 1.0 - a
    r = 1.0 - b
    if r == 0.0:
        raise ValueError("privleak is undefined when auc_retain_model == 1 (reference 1 - AUC is 0)")
    return (s - r) / r * 100.0
