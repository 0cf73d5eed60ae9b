"""scripts/scope_pairs.py on hand-made report tables: the simu - all difference keeps its sign whichever
curve the report lists first, and a loss that was not run is left out."""

from __future__ import annotations


import pandas as pd
import pytest

from tests.conftest import load_script



@pytest.fixture(scope="module")
def scope_pairs():
    return load_script("scope_pairs")


def test_each_loss_pairs_its_two_scopes_with_the_right_sign(scope_pairs):
    best = pd.DataFrame({
        "curve": ["so_graddiff", "simu", "so_wga", "simu_wga"],
        "lr": [5e-5, 1.2e-4, 1e-4, None],
        "model_utility_mean": [0.67, 0.65, 0.70, None], "retain_prob_mean": [0.64, 0.61, 0.85, None],
        "note": ["", "", "", "no lr has every reading matched: ..."],
    })
    pairs = pd.DataFrame({
        # The report lists so_graddiff first: simu - all is minus its difference.
        "curve_a": ["so_graddiff", "simu_wga"], "curve_b": ["simu", "so_wga"], "pairs": [9, 4],
        "spread": ["3 targets x 3 seeds = 9 readings", "4 readings (2 targets, 3 seeds)"],
        "model_utility_diff_mean": [0.021, 0.05], "model_utility_diff_std": [0.031, 0.01],
        "model_utility_beyond_std": [False, True], "model_utility_beyond_2se": [True, True],
        "retain_prob_diff_mean": [0.029, -0.02], "retain_prob_diff_std": [0.074, 0.03],
        "retain_prob_beyond_std": [False, False], "retain_prob_beyond_2se": [False, False],
    })
    table = scope_pairs.scope_pairs(best, pairs, ("model_utility", "retain_prob")).set_index("loss")
    assert list(table.index) == ["graddiff", "wga"]  # npo, rmu, ... were not run
    assert table.loc["graddiff", "diff_model_utility"] == pytest.approx(-0.021)
    assert table.loc["graddiff", "diff_retain_prob"] == pytest.approx(-0.029)
    assert table.loc["wga", "diff_model_utility"] == pytest.approx(0.05)
    assert pd.isna(table.loc["wga", "simu_best_lr"])
    text = scope_pairs.markdown(table.reset_index(), ("model_utility", "retain_prob"))
    assert "**-0.021** ± 0.031 (9)" in text and "none (no lr has every reading matched)" in text
    assert "| 3 targets x 3 seeds = 9 readings |" in text  # every spread says what it runs over
