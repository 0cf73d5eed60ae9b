"""Matched-forgetting comparison (hand-computed crossings), the random-neuron mask rule and the
contrastive score."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from simu_core.matched import Level, MatchedForgettingError, crossing, matched_forgetting, matched_markdown
from simu_core.thresholding import contrastive_scores, layer_relative_critical, select_mask


def runs_table(curves: dict[str, dict[int, list[tuple[float, float, float]]]]) -> pd.DataFrame:
    """Rows (method, seed, lr, forget_prob, model_utility) from {method: {seed: [(lr, fp, mu)]}}."""
    rows = []
    for method, seeds in curves.items():
        for seed, points in seeds.items():
            for lr, forget_prob, utility in points:
                rows.append({"config.unlearn.method": method, "config.run.seed": seed, "config.unlearn.lr": lr,
                             "forget_prob": forget_prob, "model_utility": utility, "retain_prob": utility})
    return pd.DataFrame(rows)


LEVEL = Level("forget_prob", 0.01, below=True, source="test")


def test_crossing_interpolates_in_log_forget_prob_and_log_lr():
    curve = runs_table({"a": {0: [(1e-4, 1.0, 0.9), (1e-3, 0.1, 0.8), (1e-2, 0.001, 0.4)]}})
    point = crossing(curve.sort_values("config.unlearn.lr"), LEVEL, ["model_utility"])
    # log10 fp goes -1 -> -3; level -2 is half way: utility 0.6, lr 10^-2.5.
    assert point["reached"] and not point["at_smallest_lr"]
    assert point["model_utility"] == pytest.approx(0.6)
    assert point["lr"] == pytest.approx(10 ** -2.5)


def test_table_mean_std_over_seeds_and_methods_that_never_reach():
    runs = runs_table({
        "simu": {0: [(1e-4, 1.0, 0.9), (1e-3, 0.1, 0.8), (1e-2, 0.001, 0.4)],
                 1: [(1e-4, 1.0, 0.9), (1e-3, 0.01, 0.7), (1e-2, 0.001, 0.4)]},
        "ga": {0: [(1e-4, 1.0, 0.9), (1e-3, 0.5, 0.8), (1e-2, 0.2, 0.4)],
               1: [(1e-4, 1.0, 0.9), (1e-3, 0.5, 0.8), (1e-2, 0.2, 0.4)]},
    })
    table = matched_forgetting(runs, ["config.unlearn.method", "config.unlearn.lr"], LEVEL).set_index("curve")
    assert table.loc["simu", "seeds_reached"] == 2
    assert table.loc["simu", "model_utility_mean"] == pytest.approx(0.65)  # 0.6 (interpolated) and 0.7 (on grid)
    assert table.loc["simu", "model_utility_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert table.loc["ga", "seeds_reached"] == 0
    assert math.isnan(table.loc["ga", "model_utility_mean"])
    assert "never reaches forget_prob <= 0.01" in table.loc["ga", "note"]
    text = matched_markdown(table.reset_index(), LEVEL)
    assert "never reached" in text and "0.650 ± 0.071" in text


def test_curve_already_past_the_level_is_flagged_and_quality_level_counts_from_below():
    runs = runs_table({"so": {0: [(1e-4, 0.001, 0.5), (1e-3, 0.0001, 0.3)]}})
    table = matched_forgetting(runs, ["config.unlearn.lr"], LEVEL)
    assert table.loc[0, "model_utility_mean"] == pytest.approx(0.5)
    assert "at the smallest lr" in table.loc[0, "note"]
    quality = runs.assign(forget_quality=[0.01, 0.2])
    table = matched_forgetting(quality, ["config.unlearn.lr"], Level("forget_quality", 0.05, below=False, source="t"))
    # log10 q: -2 -> -0.699; level -1.301 at weight 0.537.
    weight = (math.log10(0.05) + 2) / (math.log10(0.2) + 2)
    assert table.loc[0, "model_utility_mean"] == pytest.approx(0.5 + weight * (0.3 - 0.5))


def test_fewer_than_two_learning_rates_is_a_clear_error():
    runs = runs_table({"simu": {0: [(1e-3, 0.1, 0.8)]}})
    with pytest.raises(MatchedForgettingError, match="at least 2 learning rates per method; 'simu' has 1"):
        matched_forgetting(runs, ["config.unlearn.method"], LEVEL)
    with pytest.raises(MatchedForgettingError, match="no run reports forget_quality"):
        matched_forgetting(runs, [], Level("forget_quality", 0.05, below=False, source="t"))


def test_random_rule_keeps_per_layer_counts_and_the_critical_columns():
    rng = np.random.default_rng(0)
    forget = [rng.normal(size=50), rng.normal(size=50)]
    retain = [rng.normal(size=50), rng.normal(size=50)]
    paper = select_mask(forget, retain, threshold=0.3, variant="exclude")
    control = select_mask(forget, retain, threshold=0.3, variant="exclude", rule="random", seed=7)
    assert control.mask.counts() == paper.mask.counts()
    assert control.mask != paper.mask
    assert control.critical_forget == paper.critical_forget  # what the knockout compares against
    assert select_mask(forget, retain, 0.3, "exclude", rule="random", seed=7).mask == control.mask
    assert select_mask(forget, retain, 0.3, "exclude", rule="random", seed=8).mask != control.mask


def test_contrastive_score_drops_neurons_every_answer_needs():
    forget = [np.array([10.0, 9.0, 1.0, 0.0])]  # neuron 0: needed by every answer; neuron 1: forget only
    retain = [np.array([20.0, 0.0, 0.5, 0.0])]  # two retain samples per forget sample
    scores = contrastive_scores(forget, 1, retain, 2)
    np.testing.assert_allclose(scores[0], [0.0, 9.0, 0.75, 0.0])
    assert layer_relative_critical(forget, 0.5).neurons == ((0, 1),)
    assert layer_relative_critical(scores, 0.5).neurons == ((1,),)
    with pytest.raises(ValueError, match="positive sample counts"):
        contrastive_scores(forget, 0, retain, 2)


def test_curve_labels_name_the_controls_and_not_a_baselines_mask_settings():
    from simu_core.matched import curve_label

    columns = ["config.unlearn.method", "config.mask.rule", "config.unlearn.train_attention", "config.mask.score"]
    row = pd.Series({"config.unlearn.method": "simu", "config.mask.rule": "random",
                     "config.unlearn.train_attention": False, "config.mask.score": "contrastive"})
    assert curve_label(row, columns) == "simu (random neurons) (MLP only) score=contrastive"
    baseline = row.copy()
    baseline["config.unlearn.method"] = "so_graddiff"
    assert curve_label(baseline, columns) == "so_graddiff"


def test_runs_written_before_a_config_field_existed_stay_one_setting(tmp_path):
    from simu_core import reporting

    old = runs_table({"simu": {0: [(1e-4, 0.5, 0.8), (1e-3, 0.01, 0.6)]}})
    new = runs_table({"simu": {1: [(1e-4, 0.4, 0.8), (1e-3, 0.02, 0.6)]}}).assign(**{"config.run.devices": 1})
    table = pd.concat([old, new], ignore_index=True)  # the old rows have no config.run.devices: NaN
    table = table.assign(status="completed", kind="run", time=pd.Timestamp("2026-01-01", tz="UTC"),
                         config_hash=[f"h{i}" for i in range(len(table))], forget_quality=0.1, run_id="r")
    table.to_parquet(tmp_path / "runs.parquet")
    rerun = table.iloc[[0]].assign(**{"config.run.devices": 1.0, "config_hash": "h-new",
                                       "time": pd.Timestamp("2026-02-01", tz="UTC"), "model_utility": 0.7})
    pd.concat([table, rerun], ignore_index=True).to_parquet(tmp_path / "runs.parquet")
    runs = reporting.read_runs(tmp_path)
    assert len(runs) == 4  # the re-run of the first configuration replaces it
    assert sorted(runs["model_utility"]) == [0.6, 0.6, 0.7, 0.8]
    assert runs["config.run.devices"].tolist() == [1.0] * 4
    assert reporting.setting_columns(runs) == ["config.unlearn.lr"]
    reporting.plot_tradeoff(runs, tmp_path / "tradeoff.png")  # one curve, no empty group
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
