"""Hand-computed checks of the TOFU metric functions (simu_core.metrics.tofu and .rouge)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simu_core.metrics import rouge, tofu
from simu_core.metrics.tofu import MODEL_UTILITY_COMPONENTS, OPEN_UNLEARNING_EPS

LN2 = math.log(2.0)
LN4 = math.log(4.0)
LN16 = math.log(16.0)


# ----------------------------------------------------------------------------- probabilities


def test_probability_from_nll_hand_values():
    # exp(-0) = 1, exp(-ln 2) = 1/2, exp(-ln 4) = 1/4
    np.testing.assert_allclose(tofu.probability_from_nll([0.0, LN2, LN4]), [1.0, 0.5, 0.25], rtol=1e-15)
    # mean(1, 0.5, 0.25) = 1.75 / 3 = 0.583333...
    assert tofu.mean_probability([0.0, LN2, LN4]) == pytest.approx(1.75 / 3, rel=1e-15)


def test_normalised_probability_hand_values():
    # item 0: P(a)=exp(-0)=1, P(wrong)=[1/2, 1/4]      -> 1 / (1 + 0.75)        = 0.5714285714...
    # item 1: P(a)=1/2,      P(wrong)=[1/4, 1/4, 1/4] -> 0.5 / (0.5 + 0.75)     = 0.4
    # (ragged: 2 and 3 perturbed answers)
    out = tofu.normalised_probability([0.0, LN2], [[LN2, LN4], [LN4, LN4, LN4]])
    np.testing.assert_allclose(out, [1 / 1.75, 0.4], rtol=1e-14)
    # mean = (0.571428... + 0.4) / 2 = 0.485714...
    assert tofu.mean_normalised_probability([0.0, LN2], [[LN2, LN4], [LN4, LN4, LN4]]) == pytest.approx(
        (1 / 1.75 + 0.4) / 2, rel=1e-14
    )


def test_normalised_probability_eps_is_added_to_denominator():
    # P(a)=1, P(wrong)=[1/2, 1/4], eps=0.25 -> 1 / (1 + 0.75 + 0.25) = 0.5
    out = tofu.normalised_probability([0.0], [[LN2, LN4]], eps=0.25)
    assert out[0] == pytest.approx(0.5, rel=1e-15)


def test_normalised_probability_tiny_probabilities_do_not_underflow():
    # P(a) = exp(-800), P(wrong) = 3 x exp(-800): exp(-800) underflows to 0 in float64, the
    # log-space formula still gives 1 / (1 + 3) = 0.25.
    out = tofu.normalised_probability([800.0], [[800.0, 800.0, 800.0]])
    assert out[0] == pytest.approx(0.25, rel=1e-12)


# ----------------------------------------------------------------------------- truth ratio


def test_truth_ratio_hand_values():
    # item 0: nll_right=1, nll_wrong=[2, 4] (mean 3)      -> exp(1 - 3) = exp(-2) = 0.1353352832366127
    # item 1: P(right)=1/2, P(wrong)=[1/4, 1/16]; geometric mean sqrt(1/64) = 1/8 -> (1/8)/(1/2) = 0.25
    r = tofu.truth_ratio([1.0, LN2], [[2.0, 4.0], [LN4, LN16]])
    np.testing.assert_allclose(r, [0.1353352832366127, 0.25], rtol=1e-14)


def test_truth_ratio_with_eps_matches_open_unlearning_formula():
    # exp(-mean nll_wrong) / (exp(-nll_right) + eps) = (1/8) / (1/2 + 1/2) = 0.125
    r = tofu.truth_ratio([LN2], [[LN4, LN16]], eps=0.5)
    assert r[0] == pytest.approx(0.125, rel=1e-14)


def test_truth_ratio_scores_hand_values():
    ratios = [0.5, 2.0, 1.0, 0.25]
    # min(R, 1/R) = [0.5, 0.5, 1, 0.25] -> 2.25 / 4 = 0.5625
    assert tofu.truth_ratio_score_forget(ratios) == pytest.approx(0.5625, rel=1e-15)
    # max(0, 1 - R) = [0.5, 0, 0, 0.75] -> 1.25 / 4 = 0.3125
    assert tofu.truth_ratio_score_true_better(ratios) == pytest.approx(0.3125, rel=1e-15)


# ----------------------------------------------------------------------------- forget quality


def test_forget_quality_identical_distributions_is_one():
    r = [0.3, 0.7, 1.2, 0.05, 2.0]
    assert tofu.forget_quality(r, r) == 1.0


def test_forget_quality_disjoint_samples_exact_pvalue():
    # n = m = 3, all of one sample below the other: D = 1. Exact two-sided p-value = number of
    # arrangements with D >= 1 (2: all-low or all-high) / C(6, 3) = 2 / 20 = 0.1
    assert tofu.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, rel=1e-12)


# ----------------------------------------------------------------------------- model utility


def test_model_utility_worked_example_from_metrics_md():
    values = dict(zip(MODEL_UTILITY_COMPONENTS, [0.989, 0.981, 0.460, 0.468, 0.917, 0.612, 0.424, 0.905, 0.552]))
    # 9 / sum(1/x_i) = 9 / 14.34055... = 0.62758...
    assert round(tofu.model_utility(values), 4) == 0.6276


def test_model_utility_hand_value():
    # three 1.0, three 0.5, three 0.25: 9 / (3*1 + 3*2 + 3*4) = 9 / 21 = 0.428571...
    xs = [1.0, 0.5, 0.25] * 3
    assert tofu.model_utility(dict(zip(MODEL_UTILITY_COMPONENTS, xs))) == pytest.approx(9 / 21, rel=1e-14)


def test_model_utility_zero_component_gives_zero():
    values = dict.fromkeys(MODEL_UTILITY_COMPONENTS, 0.5)
    values["wf_rouge"] = 0.0
    assert tofu.model_utility(values) == 0.0


def test_model_utility_missing_and_extra_keys_are_named():
    values = dict.fromkeys(MODEL_UTILITY_COMPONENTS, 0.5)
    del values["ra_truth_ratio"]
    with pytest.raises(ValueError, match="ra_truth_ratio"):
        tofu.model_utility(values)
    values = dict.fromkeys(MODEL_UTILITY_COMPONENTS, 0.5)
    values["forget_rouge"] = 0.4
    with pytest.raises(ValueError, match="forget_rouge"):
        tofu.model_utility(values)


def test_model_utility_rejects_nan_and_negative():
    values = dict.fromkeys(MODEL_UTILITY_COMPONENTS, 0.5)
    values["retain_prob"] = float("nan")
    with pytest.raises(ValueError, match="retain_prob"):
        tofu.model_utility(values)
    values["retain_prob"] = -0.1
    with pytest.raises(ValueError, match="retain_prob"):
        tofu.model_utility(values)


# ----------------------------------------------------------------------------- extraction strength


@pytest.mark.parametrize(
    ("matches", "expected", "expected_ou"),
    [
        ([True, True, True, True], 1.0, 1.0),  # k* = 0 -> 1 - 0/4
        ([False, True, True, True], 0.75, 0.75),  # k* = 1 -> 1 - 1/4
        ([True, False, True, True], 0.5, 0.5),  # k* = 2 -> 1 - 2/4
        ([False, False, False, True], 0.25, 0.25),  # k* = 3 -> 1 - 3/4
        ([True, True, True, False], 0.0, 0.25),  # k* = 4 (empty suffix) -> 0; open-unlearning stops at 3
        ([0, 0, 0, 0], 0.0, 0.25),
    ],
)
def test_extraction_strength(matches, expected, expected_ou):
    assert tofu.extraction_strength(matches) == pytest.approx(expected, abs=1e-15)
    assert tofu.extraction_strength(matches, match_open_unlearning=True) == pytest.approx(expected_ou, abs=1e-15)


def test_exact_memorization():
    # 3 of 4 tokens match -> 0.75
    assert tofu.exact_memorization([True, False, True, True]) == 0.75


def test_extraction_strength_rejects_non_boolean():
    with pytest.raises(ValueError, match="index 1"):
        tofu.extraction_strength([1, 2, 1])


# ----------------------------------------------------------------------------- privleak


def test_privleak_hand_values():
    # s = 1 - 0.75 = 0.25, r = 1 - 0.5 = 0.5: (0.25 - 0.5) / 0.5 * 100 = -50
    assert tofu.privleak(0.75, 0.5) == pytest.approx(-50.0, rel=1e-15)
    # s = 0.75, r = 0.5: +50
    assert tofu.privleak(0.25, 0.5) == pytest.approx(50.0, rel=1e-15)
    assert tofu.privleak(0.4, 0.4) == 0.0


def test_privleak_rejects_bad_auc():
    with pytest.raises(ValueError, match="auc_retain_model"):
        tofu.privleak(0.5, 1.0)
    with pytest.raises(ValueError, match="auc_model"):
        tofu.privleak(1.5, 0.5)


# ----------------------------------------------------------------------------- input validation


def test_length_mismatch_names_both_arguments():
    with pytest.raises(ValueError, match=r"nll_right and nll_wrong_matrix .* 2 and 1"):
        tofu.truth_ratio([1.0, 2.0], [[1.0, 2.0]])


def test_nan_is_reported_with_argument_and_index():
    with pytest.raises(ValueError, match=r"nll_right .* index 1"):
        tofu.truth_ratio([1.0, float("nan")], [[1.0], [2.0]])
    with pytest.raises(ValueError, match=r"nll_wrong_matrix .* index \[1, 0\]"):
        tofu.truth_ratio([1.0, 1.0], [[1.0], [float("inf")]])
    with pytest.raises(ValueError, match=r"unlearned_truth_ratios .* index 2"):
        tofu.forget_quality([0.1, 0.2, float("inf")], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"ratios .* index 0"):
        tofu.truth_ratio_score_forget([float("nan")])


def test_empty_inputs_rejected():
    with pytest.raises(ValueError, match="retain_truth_ratios is empty"):
        tofu.forget_quality([0.5], [])
    with pytest.raises(ValueError, match="nll is empty"):
        tofu.mean_probability([])
    with pytest.raises(ValueError, match=r"nll_wrong_matrix\[0\] is empty"):
        tofu.truth_ratio([1.0], [[]])
    with pytest.raises(ValueError, match="matches is empty"):
        tofu.extraction_strength([])


def test_negative_nll_rejected():
    # a negative NLL would mean P > 1: almost always a sign error (log-prob passed as NLL)
    with pytest.raises(ValueError, match=r"nll .* index 0"):
        tofu.probability_from_nll([-0.5])


def test_zero_ratio_rejected_for_forget_score():
    with pytest.raises(ValueError, match="index 1"):
        tofu.truth_ratio_score_forget([0.5, 0.0])


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_l_recall_hand_value():
    # gold "the cat sat on the mat" (6 tokens), generation "the cat on a mat":
    # LCS = "the cat on mat" (4 tokens) -> recall 4/6
    assert rouge.rouge_l_recall("the cat on a mat", "the cat sat on the mat") == pytest.approx(4 / 6, rel=1e-15)


def test_rouge_uses_stemmer_and_is_recall_not_f1():
    # Porter stemming: "running"->"run", "cats"->"cat": every gold token is recovered -> recall 1,
    # although the long generation has a low precision.
    gen = "Yes, the cats were running around the garden all afternoon long"
    assert rouge.rouge_l_recall(gen, "cat running") == 1.0
    s = rouge.rouge_scores(gen, "cat running")
    assert s["rougeL_f1"] < 0.5


def test_rouge_batch_and_mean():
    gens = ["the cat on a mat", "", "Paris"]
    refs = ["the cat sat on the mat", "anything", "paris"]
    # [4/6, 0 (empty generation), 1 (case-insensitive)] -> mean 5/9
    assert rouge.rouge_l_recall_batch(gens, refs) == pytest.approx([4 / 6, 0.0, 1.0], rel=1e-15)
    assert rouge.mean_rouge_l_recall(gens, refs) == pytest.approx(5 / 9, rel=1e-15)


def test_rouge_batch_validation():
    with pytest.raises(ValueError, match="2 and 1"):
        rouge.rouge_l_recall_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="generations is empty"):
        rouge.rouge_l_recall_batch([], [])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        rouge.rouge_l_recall_batch(["a", "b"], ["a", "  "])
    with pytest.raises(TypeError):
        rouge.rouge_l_recall_batch("abc", "abc")


def test_open_unlearning_eps_constant():
    assert OPEN_UNLEARNING_EPS == 1e-10
