"""Hand-computed checks of the membership-inference statistics and AUC (simu_core.metrics.mia)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from simu_core.metrics import mia

LN2 = math.log(2.0)


def test_loss_statistic_is_mean_token_nll():
    # (0.5 + 1.0 + 1.5) / 3 = 1.0
    assert mia.loss_statistic([0.5, 1.0, 1.5]) == pytest.approx(1.0, rel=1e-15)


def test_zlib_statistic_divides_by_compressed_length():
    # zlib.compress(b"hello") is 13 bytes (2 header + 7 deflate + 4 adler32) -> 2.6 / 13 = 0.2
    assert mia.zlib_length("hello") == 13 == len(zlib.compress(b"hello"))
    assert mia.zlib_statistic(2.6, "hello") == pytest.approx(0.2, rel=1e-15)
    # UTF-8 bytes are compressed, not characters
    assert mia.zlib_length("é" * 3) == len(zlib.compress("ééé".encode("utf-8")))


def test_min_k_hand_values():
    # T = 5, k = 0.4 -> int(2.0) = 2 lowest log-probs (-5, -4): -(-4.5) = 4.5
    assert mia.min_k_statistic([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(4.5, rel=1e-15)
    # T = 3 -> int(1.2) = 1 lowest: 3.0
    assert mia.min_k_statistic([-1.0, -3.0, -2.0]) == pytest.approx(3.0, rel=1e-15)
    # T = 4 -> int(1.6) = 1 (truncation, not rounding): 4.0
    assert mia.min_k_statistic([-1.0, -2.0, -3.0, -4.0]) == pytest.approx(4.0, rel=1e-15)
    # T = 1 -> max(1, int(0.4)) = 1
    assert mia.min_k_statistic([-0.7]) == pytest.approx(0.7, rel=1e-15)
    # k = 1 -> all tokens: -(-1 - 3 - 2) / 3 = 2
    assert mia.min_k_statistic([-1.0, -3.0, -2.0], k=1.0) == pytest.approx(2.0, rel=1e-15)


def test_min_k_plus_plus_hand_values():
    # z = (lp - mu) / sd = ((-1+1)/1, (-2+1)/0.5, (-3+1)/2) = (0, -2, -1)
    lp, mu, sd = [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [1.0, 0.5, 2.0]
    # k = 0.4, T = 3 -> 1 lowest z: -(-2) = 2
    assert mia.min_k_plus_plus_statistic(lp, mu, sd) == pytest.approx(2.0, rel=1e-15)
    # k = 1: -(0 - 2 - 1) / 3 = 1
    assert mia.min_k_plus_plus_statistic(lp, mu, sd, k=1.0) == pytest.approx(1.0, rel=1e-15)


def test_vocab_logprob_moments_hand_values():
    # p = (1/2, 1/4, 1/4): log p = (-ln2, -2ln2, -2ln2)
    # mu = -(1/2 ln2 + 1/2 * 2 ln2) = -1.5 ln2
    # E[(log p)^2] = 1/2 ln2^2 + 1/2 * 4 ln2^2 = 2.5 ln2^2; var = 2.5 - 2.25 = 0.25 ln2^2 -> sd = 0.5 ln2
    # p = (1, 0): log p = (0, -inf): mu = 0, var = 0 -> clamped to 1e-6 -> sd = 1e-3
    lp = np.array([[-LN2, -2 * LN2, -2 * LN2], [0.0, -np.inf, -np.inf]])
    mu, sd = mia.vocab_logprob_moments(lp)
    np.testing.assert_allclose(mu, [-1.5 * LN2, 0.0], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sd, [0.5 * LN2, 1e-3], rtol=1e-12)


def test_auc_perfect_separation_and_reverse():
    # every member statistic (e.g. loss) below every non-member: AUC 1 (forget still memorised)
    assert mia.auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    # the reverse: AUC 0
    assert mia.auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    # identical statistics: all pairs tied -> 0.5
    assert mia.auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


def test_auc_hand_values_with_ties():
    # members [1, 3], non-members [2, 4]: pairs with nonmember > member: (2>1), (4>1), (4>3) = 3 of 4
    assert mia.auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75, rel=1e-15)
    # members [1, 2], non-members [2, 3]: (2>1)=1, (2=2)=0.5, (3>1)=1, (3>2)=1 -> 3.5 / 4
    assert mia.auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.875, rel=1e-15)


def test_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    m = np.round(rng.normal(0.0, 1.0, 57), 1)  # rounding creates ties
    n = np.round(rng.normal(0.4, 1.0, 43), 1)
    diff = n[None, :] - m[:, None]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / (len(m) * len(n))
    assert mia.auc(m, n) == pytest.approx(expected, rel=1e-14)


def test_validation_errors():
    with pytest.raises(ValueError, match="member_scores is empty"):
        mia.auc([], [1.0])
    with pytest.raises(ValueError, match=r"nonmember_scores .* index 1"):
        mia.auc([1.0], [1.0, float("nan")])
    # log-probs must be <= 0: passing NLLs by mistake is caught
    with pytest.raises(ValueError, match=r"token_logprobs .* index 0"):
        mia.min_k_statistic([0.5, -1.0])
    with pytest.raises(ValueError, match=r"token_logprobs and vocab_mean .* 2 and 1"):
        mia.min_k_plus_plus_statistic([-1.0, -2.0], [-1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"vocab_std must be > 0.* index 1"):
        mia.min_k_plus_plus_statistic([-1.0, -2.0], [-1.0, -1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="k must be"):
        mia.min_k_statistic([-1.0], k=0.0)
    with pytest.raises(ValueError, match="text is empty"):
        mia.zlib_statistic(1.0, "")
    with pytest.raises(ValueError, match=r"token_nlls .* index 2"):
        mia.loss_statistic([1.0, 2.0, float("inf")])
    with pytest.raises(ValueError, match=r"vocab_logprobs .* index \[0, 1\]"):
        mia.vocab_logprob_moments([[-1.0, float("nan")]])
