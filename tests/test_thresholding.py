"""Thresholding (SIMU step 1b): layer-relative and global rules, edge cases, variants, the
dual-neuron analysis, the mask table, and the threshold_mask stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simu_core.attribution import attribution_table, read_scores, write_scores
from simu_core.masking import MASK_COLUMNS, NeuronMask
from simu_core.thresholding import (
    apply_variant,
    critical_neurons,
    dual_neuron_analysis,
    global_top_fraction_critical,
    jaccard,
    layer_relative_critical,
    select_mask,
    threshold_jaccard,
)


def random_scores(seed: int, layers: int = 3, neurons: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=neurons) for _ in range(layers)]


def test_layer_relative_rule():
    scores = [np.array([-1.0, 1.0, 2.0, 4.0, 10.0]), np.array([3.0, 0.5, 2.9, -4.0])]
    mask = layer_relative_critical(scores, 0.2)
    # layer 0: >= 0.2 * 10 = 2 (the tie at exactly t * max is kept); layer 1: >= 0.6
    assert mask.neurons == ((2, 3, 4), (0, 2))
    assert mask.num_neurons == (5, 4)
    # Larger t, fewer neurons; the sets are nested.
    previous = None
    for t in (0.05, 0.1, 0.3, 0.5, 0.9, 1.0):
        current = layer_relative_critical(scores, t)
        if previous is not None:
            assert all(set(c) <= set(p) for c, p in zip(current.neurons, previous.neurons))
        previous = current


def test_t_one_keeps_only_each_layers_maximum():
    scores = random_scores(0) + [np.array([0.0, 7.0, 7.0, 1.0])]
    mask = layer_relative_critical(scores, 1.0)
    for layer, indices in enumerate(mask.neurons[:3]):
        assert indices == (int(np.argmax(scores[layer])),)
    assert mask.neurons[3] == (1, 2)  # a tie at the maximum keeps both


def test_layer_whose_maximum_is_not_positive_contributes_nothing():
    scores = [np.array([-3.0, -1.0, -2.0]), np.zeros(4), np.array([0.0, -1.0, 2.0])]
    for t in (0.01, 0.5, 1.0):
        mask = layer_relative_critical(scores, t)
        assert mask.neurons[0] == () and mask.neurons[1] == ()
        assert mask.neurons[2] == (2,)
    # The global rule never picks a non-positive score either.
    assert global_top_fraction_critical(scores, 1.0).neurons == ((), (), (2,))


def test_global_top_fraction_rule():
    scores = [np.array([5.0, 1.0, 3.0]), np.array([4.0, 2.0, 0.5, 6.0])]
    mask = global_top_fraction_critical(scores, 3 / 7)  # ceil(3) = 3 neurons: 6, 5, 4
    assert mask.neurons == ((0,), (0, 3))
    assert global_top_fraction_critical(scores, 0.01).total() == 1  # at least one
    # Ties are broken by (layer, neuron) order, deterministically.
    tied = [np.array([1.0, 1.0]), np.array([1.0, 1.0])]
    assert global_top_fraction_critical(tied, 0.5).neurons == ((0, 1), ())
    assert critical_neurons(scores, "global_top_fraction", top_fraction=3 / 7) == mask


def test_variants_partition_as_specified():
    forget, retain = random_scores(1), random_scores(2)
    for t in (0.1, 0.3, 0.6):
        include = select_mask(forget, retain, t, "include")
        exclude = select_mask(forget, retain, t, "exclude")
        only = select_mask(forget, retain, t, "only")
        c_f = layer_relative_critical(forget, t)
        c_r = layer_relative_critical(retain, t)
        assert include.mask == c_f and include.critical_forget == c_f and include.critical_retain == c_r
        for layer in range(len(forget)):
            f, r = set(c_f.neurons[layer]), set(c_r.neurons[layer])
            ex, on = set(exclude.mask.neurons[layer]), set(only.mask.neurons[layer])
            assert ex == f - r and on == f & r
            assert ex | on == f and not ex & on  # exclude and only partition include
    assert select_mask(forget, None, 0.2, "include").critical_retain is None
    with pytest.raises(ValueError, match="needs retain-set scores"):
        select_mask(forget, None, 0.2, "exclude")
    with pytest.raises(ValueError, match="variant must be one of"):
        select_mask(forget, retain, 0.2, "both")
    with pytest.raises(ValueError, match="differ in shape"):
        apply_variant(layer_relative_critical(forget, 0.2), layer_relative_critical(forget[:2], 0.2), "only")


def test_mask_table_and_round_trip(tmp_path):
    forget, retain = random_scores(3), random_scores(4)
    selection = select_mask(forget, retain, 0.3, "exclude")
    table = selection.table()
    assert tuple(table.columns) == MASK_COLUMNS
    assert len(table) == sum(len(layer) for layer in forget)
    assert (table["dual"] == (table["critical_forget"] & table["critical_retain"])).all()
    assert (table["in_mask"] == (table["critical_forget"] & ~table["critical_retain"])).all()
    selection.mask.save(tmp_path / "mask.parquet", critical_forget=selection.critical_forget,
                        critical_retain=selection.critical_retain)
    assert NeuronMask.load(tmp_path / "mask.parquet") == selection.mask
    counts = selection.counts()
    assert counts["masked"] == int(table["in_mask"].sum())
    assert counts["dual"] == int(table["dual"].sum())
    assert counts["masked_per_layer"] == selection.mask.counts()


def test_dual_neuron_analysis_and_threshold_jaccard():
    forget, retain = random_scores(5), random_scores(6)
    thresholds = [0.1, 0.3, 0.5]
    analysis = dual_neuron_analysis(forget, retain, thresholds)
    assert list(analysis.columns) == [
        "threshold", "layer", "neurons", "critical_forget", "critical_retain", "dual", "masked", "fraction_masked"
    ]
    assert len(analysis) == len(thresholds) * len(forget)
    for row in analysis.itertuples():
        c_f = set(layer_relative_critical(forget, row.threshold).neurons[row.layer])
        c_r = set(layer_relative_critical(retain, row.threshold).neurons[row.layer])
        assert (row.critical_forget, row.critical_retain, row.dual) == (len(c_f), len(c_r), len(c_f & c_r))
        assert row.masked == len(c_f) and row.fraction_masked == pytest.approx(len(c_f) / row.neurons)
    only = dual_neuron_analysis(forget, retain, thresholds, variant="only")
    assert (only["masked"] == only["dual"]).all()
    no_retain = dual_neuron_analysis(forget, None, [0.2])
    assert (no_retain["critical_retain"] == 0).all() and (no_retain["dual"] == 0).all()

    pairs = threshold_jaccard(forget, retain, thresholds + [0.3])  # duplicates are ignored
    assert list(zip(pairs["threshold_a"], pairs["threshold_b"])) == [(0.1, 0.3), (0.1, 0.5), (0.3, 0.5)]
    # include masks are nested in t, so the Jaccard of two thresholds is |larger t| / |smaller t|.
    for row in pairs.itertuples():
        assert row.jaccard == pytest.approx(row.masked_b / row.masked_a)
    empty = NeuronMask.from_boolean([np.zeros(3, bool)])
    assert jaccard(empty, empty) == 1.0
    assert jaccard(empty, NeuronMask.from_boolean([np.array([True, False, False])])) == 0.0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0001, 2, float("nan"), "0.2", True])
def test_threshold_outside_zero_one_is_refused(threshold):
    scores = random_scores(7)
    with pytest.raises(ValueError, match=r"threshold t must be"):
        layer_relative_critical(scores, threshold)
    with pytest.raises(ValueError, match=r"threshold t must be"):
        dual_neuron_analysis(scores, None, [0.2, threshold])


def test_other_bad_input_is_refused():
    scores = random_scores(8)
    with pytest.raises(ValueError, match="top_fraction must be in"):
        global_top_fraction_critical(scores, 0.0)
    with pytest.raises(ValueError, match="rule must be one of"):
        critical_neurons(scores, "percentile")
    with pytest.raises(ValueError, match="non-finite"):
        layer_relative_critical([np.array([1.0, np.nan])], 0.5)
    with pytest.raises(ValueError, match="no layer"):
        layer_relative_critical([], 0.5)
    with pytest.raises(ValueError, match="at least one threshold"):
        dual_neuron_analysis(scores, None, [])


def _write_set(folder, scores, which, sha="same"):
    table = pd.concat(
        [pd.DataFrame({"layer": layer, "neuron": np.arange(len(s)), "score": s}) for layer, s in enumerate(scores)],
        ignore_index=True,
    )
    write_scores(table, folder / "scores.parquet", {"which": which, "model": {"down_proj_sha256": sha}})


def test_threshold_mask_stage(tmp_path, small_config):
    from simu_core.stages import threshold_mask

    forget, retain = random_scores(9), random_scores(10)
    _write_set(tmp_path / "f", forget, "forget")
    _write_set(tmp_path / "r", retain, "retain")
    config = small_config.model_copy(deep=True)
    config.mask.threshold = 0.25
    config.mask.variant = "exclude"
    counts = threshold_mask(config, tmp_path / "f", tmp_path / "r", tmp_path / "out")
    expected = select_mask(forget, retain, 0.25, "exclude")
    mask_table = pd.read_parquet(tmp_path / "out" / "mask.parquet")
    assert NeuronMask.from_table(mask_table) == expected.mask
    assert tuple(mask_table.columns) == MASK_COLUMNS
    assert counts["masked"] == expected.mask.total() and counts["dual"] == int(mask_table["dual"].sum())
    analysis = pd.read_parquet(tmp_path / "out" / "dual_analysis.parquet")
    assert sorted(analysis["threshold"].unique()) == [0.1, 0.2, 0.25, 0.3, 0.5]
    at_t = analysis[analysis["threshold"] == 0.25]
    assert at_t["masked"].tolist() == expected.mask.counts()
    assert len(pd.read_parquet(tmp_path / "out" / "threshold_jaccard.parquet")) == 10  # 5 choose 2
    combined, meta = read_scores(tmp_path / "out" / "scores.parquet")
    assert list(combined.columns) == ["layer", "neuron", "forget_score", "retain_score", "selection_score"]
    assert combined["selection_score"].equals(combined["forget_score"])  # mask.score=forget (the paper)
    assert meta["forget"]["which"] == "forget" and meta["retain"]["which"] == "retain"
    # Without retain scores: include works, exclude cannot.
    config.mask.variant = "include"
    assert threshold_mask(config, tmp_path / "f", None, tmp_path / "out2")["critical_retain"] is None
    config.mask.variant = "only"
    with pytest.raises(ValueError, match="needs retain-set scores"):
        threshold_mask(config, tmp_path / "f", None, tmp_path / "out3")
    # Scores of two different models are not combined.
    _write_set(tmp_path / "other", retain, "retain", sha="different")
    with pytest.raises(ValueError, match="different models"):
        threshold_mask(config, tmp_path / "f", tmp_path / "other", tmp_path / "out4")


def test_attribution_table_feeds_thresholding():
    forget, retain = random_scores(11), random_scores(12)
    table = attribution_table(forget, retain)
    from simu_core.attribution import scores_from_table

    assert select_mask(scores_from_table(table, "forget_score"), scores_from_table(table, "retain_score"), 0.2).mask \
        == select_mask(forget, retain, 0.2).mask


def test_threshold_mask_stage_contrastive_score(tmp_path, small_config):
    from simu_core.stages import threshold_mask
    from simu_core.thresholding import contrastive_scores

    forget, retain = random_scores(13), random_scores(14)
    for folder, scores, which, samples in (("f", forget, "forget", 30), ("r", retain, "retain", 60)):
        table = pd.concat([pd.DataFrame({"layer": layer, "neuron": np.arange(len(s)), "score": s})
                           for layer, s in enumerate(scores)], ignore_index=True)
        write_scores(table, tmp_path / folder / "scores.parquet",
                     {"which": which, "num_samples": samples, "model": {"down_proj_sha256": "same"}})
    config = small_config.model_copy(deep=True)
    config.mask.score = "contrastive"
    threshold_mask(config, tmp_path / "f", tmp_path / "r", tmp_path / "out")
    contrast = contrastive_scores(forget, 30, retain, 60)
    mask_table = pd.read_parquet(tmp_path / "out" / "mask.parquet")
    assert NeuronMask.from_table(mask_table) == select_mask(contrast, retain, config.mask.threshold).mask
    combined, _ = read_scores(tmp_path / "out" / "scores.parquet")
    np.testing.assert_allclose(combined["selection_score"], np.concatenate(contrast))
    with pytest.raises(ValueError, match="needs the retain-set attribution"):
        threshold_mask(config, tmp_path / "f", None, tmp_path / "out2")
