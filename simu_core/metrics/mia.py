"""Membership-inference statistics and AUC, as open-unlearning computes them for TOFU.

Per-item statistics (higher = looks less like a training member):
- LOSS: mean answer-token NLL.
- ZLib: mean answer-token NLL / ``len(zlib.compress(answer_text.encode("utf-8")))``.
  NOTE: metrics.md says "sum NLL"; the open-unlearning logs (and the original ZLib attack, which uses
  log-perplexity) divide the *mean* NLL. The stored ``mia_zlib`` scores equal
  ``mia_loss score / zlib length`` exactly, so this module uses the mean (pass a summed NLL as
  ``nll`` to get the literal metrics.md variant).
- Min-K% (k = 0.4): minus the mean of the lowest ``max(1, int(k*T))`` token log-probs.
- Min-K%++ (k = 0.4): the same on token log-probs standardised per position by the mean and std of
  log p over the vocabulary (``(log p(y_t) - mu_t) / sigma_t``).

AUC convention (open-unlearning ``mia_auc``, verified against the stored logs): members (forget set)
are labelled 0, non-members (holdout) 1, and the statistic itself is the score, so
``auc = P(stat(non-member) > stat(member)) + 0.5 * P(tie)``. AUC near 1: the forget set still looks
memorised; 0.5: indistinguishable; near 0: the forget set looks *less* familiar than unseen data.
"""

from __future__ import annotations

import zlib

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from ._validation import as_float_array, check_in_range, check_same_length, check_scalar, check_text

#: Fraction of lowest-scoring tokens kept by Min-K% and Min-K%++ (open-unlearning default).
DEFAULT_K = 0.4

#: Lower clamp applied to the vocabulary variance in Min-K%++ (open-unlearning / Min-K%++ paper code).
MIN_KPP_VARIANCE_FLOOR = 1e-6


def _token_logprobs(values: ArrayLike, name: str) -> np.ndarray:
    arr = as_float_array(values, name)
    bad = np.flatnonzero(arr > 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must be log-probabilities (<= 0), got {arr[i]!r} at index {i}")
    return arr


def loss_statistic(token_nlls: ArrayLike) -> float:
    """LOSS statistic of one item: mean NLL over its answer tokens."""
    arr = as_float_array(token_nlls, "token_nlls")
    check_in_range(arr, "token_nlls", lo=0.0)
    return float(np.mean(arr))


def zlib_length(text: str) -> int:
    """Length in bytes of ``zlib.compress(text.encode("utf-8"))`` (default compression level)."""
    check_text(text, "text", allow_empty=False)
    return len(zlib.compress(text.encode("utf-8")))


def zlib_statistic(nll: float, text: str) -> float:
    """ZLib statistic of one item: ``nll / zlib_length(text)``.

    ``nll`` is the item's mean answer-token NLL (open-unlearning; see module docstring for the
    metrics.md "sum NLL" wording); ``text`` is the answer text.
    """
    x = check_scalar(nll, "nll", lo=0.0)
    return x / zlib_length(text)


def _min_k(values: np.ndarray, k: float) -> float:
    num_k = max(1, int(len(values) * k))
    return -float(np.mean(np.sort(values)[:num_k]))


def min_k_statistic(token_logprobs: ArrayLike, k: float = DEFAULT_K) -> float:
    """Min-K% statistic of one item: minus the mean of its lowest ``max(1, int(k*T))`` token log-probs."""
    lp = _token_logprobs(token_logprobs, "token_logprobs")
    k = check_scalar(k, "k", lo=0.0, hi=1.0)
    if k == 0.0:
        raise ValueError("k must be in (0, 1]")
    return _min_k(lp, k)


def vocab_logprob_moments(vocab_logprobs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and std of log p under the model's own distribution, for Min-K%++.

    ``vocab_logprobs``: (T, V) log-softmax rows. Returns ``mu_t = sum_v p log p`` and
    ``sigma_t = sqrt(max(sum_v p (log p)^2 - mu_t^2, 1e-6))`` (open-unlearning / Min-K%++ reference).
    Entries of -inf (probability 0) are allowed and contribute nothing.
    """
    arr = np.asarray(vocab_logprobs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"vocab_logprobs must be 2-dimensional (positions x vocab), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"vocab_logprobs is empty (shape {arr.shape})")
    bad = np.argwhere(np.isnan(arr) | (arr == np.inf) | (arr > 0))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(f"vocab_logprobs must be finite log-probabilities (<= 0), got {arr[i, j]!r} at index [{i}, {j}]")
    p = np.exp(arr)
    finite = np.isfinite(arr)
    plp = np.where(finite, p * np.where(finite, arr, 0.0), 0.0)
    plp2 = np.where(finite, p * np.square(np.where(finite, arr, 0.0)), 0.0)
    mu = plp.sum(axis=-1)
    var = plp2.sum(axis=-1) - np.square(mu)
    sigma = np.sqrt(np.maximum(var, MIN_KPP_VARIANCE_FLOOR))
    return mu, sigma


def min_k_plus_plus_statistic(
    token_logprobs: ArrayLike,
    vocab_mean: ArrayLike,
    vocab_std: ArrayLike,
    k: float = DEFAULT_K,
) -> float:
    """Min-K%++ statistic of one item: Min-K% over ``(log p(y_t) - vocab_mean_t) / vocab_std_t``.

    ``vocab_mean`` / ``vocab_std``: per-position mean and std of log p over the vocabulary (see
    :func:`vocab_logprob_moments`), one per answer token.
    """
    lp = _token_logprobs(token_logprobs, "token_logprobs")
    mu = as_float_array(vocab_mean, "vocab_mean")
    sd = as_float_array(vocab_std, "vocab_std")
    check_same_length(lp, "token_logprobs", mu, "vocab_mean")
    check_same_length(lp, "token_logprobs", sd, "vocab_std")
    nonpos = np.flatnonzero(sd <= 0)
    if nonpos.size:
        i = int(nonpos[0])
        raise ValueError(f"vocab_std must be > 0, got {sd[i]!r} at index {i}")
    k = check_scalar(k, "k", lo=0.0, hi=1.0)
    if k == 0.0:
        raise ValueError("k must be in (0, 1]")
    return _min_k((lp - mu) / sd, k)


def auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC with members (forget) labelled 0, non-members (holdout) 1, score = the statistic.

    Equals ``P(nonmember > member) + 0.5 * P(tie)`` over all pairs (= sklearn ``roc_auc_score`` on
    those labels), computed with the Mann-Whitney rank formula. 1: every member has a lower
    statistic (e.g. lower loss) than every non-member; 0: the reverse.
    """
    return _auc(member_scores, nonmember_scores, "member_scores", "nonmember_scores")


def _auc(member_scores: ArrayLike, nonmember_scores: ArrayLike, member_name: str, nonmember_name: str) -> float:
    m = as_float_array(member_scores, member_name)
    n = as_float_array(nonmember_scores, nonmember_name)
    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks for ties
    n_m, n_n = len(m), len(n)
    u_nonmember = float(ranks[n_m:].sum()) - n_n * (n_n + 1) / 2.0
    return u_nonmember / (n_m * n_n)
