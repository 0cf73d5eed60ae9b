"""Knockout check: a hand-built model where the answer is known, set construction, the stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import model_factory
from simu_core.knockout import (
    knocked_out,
    knockout_check,
    knockout_sets_from_mask_table,
    mean_answer_logprobs,
    summarise,
    top_by_score,
)
from simu_core.masking import NeuronMask, random_neurons
from simu_core.prompting import IGNORE_INDEX, EncodedExample

CARRIER_LAYER, CARRIER_NEURON = 1, 17
ANSWER_TOKEN = 42


def carrier_model() -> torch.nn.Module:
    """A tiny GPT-2 in which one MLP neuron carries one token: neuron 17 of layer 1 fires
    strongly at every position (bias only) and writes the answer token's embedding direction, so
    the model predicts ANSWER_TOKEN everywhere; nothing else knows that token."""
    model = model_factory.build("gpt2", seed=3)
    mlp = model.transformer.h[CARRIER_LAYER].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, CARRIER_NEURON] = 0.0  # Conv1D weight is [d_model, d_ff]
        mlp.c_fc.bias[CARRIER_NEURON] = 4.0  # gelu(4) ~ 4 at every position
        # The output head is tied to the embeddings: a long row makes the token's logit large once the
        # carrier's write dominates the (layer-normed) residual stream.
        model.transformer.wte.weight[ANSWER_TOKEN] *= 300.0
        direction = model.transformer.wte.weight[ANSWER_TOKEN]
        mlp.c_proj.weight[CARRIER_NEURON] = 25.0 * direction / direction.norm()  # Conv1D row = neuron
    return model


def examples(count: int, answer: int, seed: int) -> list[EncodedExample]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        prompt = [1, *map(int, rng.integers(3, 40, size=5))]
        # One answer token: its (long) embedding never enters a scored position's context.
        items.append(EncodedExample(input_ids=prompt + [answer], labels=[IGNORE_INDEX] * len(prompt) + [answer]))
    return items


def single(layer_count: int, width: int, layer: int, neuron: int) -> NeuronMask:
    vectors = [np.zeros(width, dtype=bool) for _ in range(layer_count)]
    vectors[layer][neuron] = True
    return NeuronMask.from_boolean(vectors)


def test_knocking_out_the_carrier_removes_the_token_and_a_random_neuron_does_not():
    model = carrier_model()
    forget = examples(6, ANSWER_TOKEN, seed=0)  # answers are the carried token
    retain = examples(6, 50, seed=1)  # answers the carrier does not write
    intact = mean_answer_logprobs(model, forget, pad_token_id=0)
    assert intact.mean() > -1.0  # the carrier makes the token likely: p > 0.37 per token
    with knocked_out(model, single(2, model_factory.FF, CARRIER_LAYER, CARRIER_NEURON)):
        knocked = mean_answer_logprobs(model, forget, pad_token_id=0)
    assert intact.mean() - knocked.mean() > 5.0  # the token is gone (tens of nats)
    other = single(2, model_factory.FF, CARRIER_LAYER, 3)
    with knocked_out(model, other):
        assert np.abs(mean_answer_logprobs(model, forget, pad_token_id=0) - intact).max() < 0.5
    # The hooks are removed on exit: the model is intact again, bit for bit.
    assert np.array_equal(mean_answer_logprobs(model, forget, pad_token_id=0), intact)

    result = knockout_check(model, forget, retain, 0, single(2, model_factory.FF, CARRIER_LAYER, CARRIER_NEURON),
                            retain_scores=None, random_draws=5, seed=0)
    summary = result.summary.set_index("kind")
    assert summary.loc["critical", "forget_drop"] > 5.0
    assert summary.loc["critical", "forget_drop_over_random"] > 10.0
    assert summary.loc["random", "draws"] == 5
    # Retain answers are not the carried token: knocking the carrier out makes them no less likely.
    assert summary.loc["critical", "retain_drop"] < 0.5
    assert result.forward_passes == 1 + 1 + 5


def test_knockout_zeroes_the_activations_exactly_on_every_architecture():
    for architecture in ("llama", "gpt2", "gpt_neox", "opt"):
        model = model_factory.build(architecture)
        neurons = NeuronMask.from_boolean([np.arange(model_factory.FF) < 8] * model_factory.LAYERS)
        # Zeroing the activations equals zeroing the neurons' down-projection weights.
        ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
        with torch.no_grad(), knocked_out(model, neurons):
            hooked = model(input_ids=ids).logits
        from simu_core.models.adapter import ArchitectureAdapter

        with torch.no_grad():
            for layer in ArchitectureAdapter(model).layers:
                weight = layer.down.weight
                index = torch.arange(8)
                weight.index_fill_(layer.down.neuron_dim, index, 0.0)
            edited = model(input_ids=ids).logits
        torch.testing.assert_close(hooked, edited, rtol=1e-5, atol=1e-5, msg=architecture)


def test_set_construction_matches_counts_and_scores():
    widths = [8, 8, 8]
    counts = [2, 0, 3]
    drawn = random_neurons(counts, widths, np.random.default_rng(0))
    assert drawn.counts() == counts
    assert random_neurons(counts, widths, np.random.default_rng(0)) == drawn  # seeded
    scores = [np.arange(8.0), -np.arange(8.0), np.array([0, 5, 5, 1, 2, 9, 0, 0], dtype=float)]
    top = top_by_score(scores, counts)
    assert top.neurons == ((6, 7), (), (1, 2, 5))
    with pytest.raises(ValueError, match="9 neurons asked in layer 0, which has 8"):
        random_neurons([9, 0, 0], widths, np.random.default_rng(0))


def test_critical_set_of_each_variant_from_the_mask_table():
    table = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "neuron": [0, 1, 2, 0, 1, 2],
                          "critical_forget": [True, True, False, False, True, False],
                          "critical_retain": [False, True, True, False, False, False],
                          "in_mask": [False, False, True, True, False, False]})  # e.g. a random mask
    assert knockout_sets_from_mask_table(table, "include").neurons == ((0, 1), (1,))
    assert knockout_sets_from_mask_table(table, "exclude").neurons == ((0,), (1,))
    assert knockout_sets_from_mask_table(table, "only").neurons == ((1,), ())


def test_bad_inputs_are_named():
    model = model_factory.build("llama")
    forget, retain = examples(2, 10, 0), examples(2, 11, 1)
    empty = NeuronMask.from_boolean([np.zeros(model_factory.FF, bool)] * model_factory.LAYERS)
    with pytest.raises(ValueError, match="critical set is empty"):
        knockout_check(model, forget, retain, 0, empty, None)
    some = NeuronMask.from_boolean([np.arange(model_factory.FF) < 2] * model_factory.LAYERS)
    with pytest.raises(ValueError, match="curve size 65 neurons per layer: the smallest layer has 64"):
        knockout_check(model, forget, retain, 0, some, None, forget_scores=[np.ones(64)] * 2, curve_sizes=[4, 65])
    with pytest.raises(ValueError, match="mask shape does not match the model"):
        knockout_check(model, forget, retain, 0, NeuronMask.from_boolean([np.ones(10, bool)]), None)


def test_summary_selectivity_and_ratio_are_computed_from_mean_drops():
    sets = pd.DataFrame([
        {"kind": "intact", "draw": 0, "neurons": 0, "forget_drop": 0.0, "retain_drop": 0.0,
         "forget_prob_drop": 0.0, "retain_prob_drop": 0.0},
        {"kind": "critical", "draw": 0, "neurons": 4, "forget_drop": 0.6, "retain_drop": 0.1,
         "forget_prob_drop": 0.2, "retain_prob_drop": 0.01},
        {"kind": "random", "draw": 0, "neurons": 4, "forget_drop": 0.1, "retain_drop": 0.1,
         "forget_prob_drop": 0.0, "retain_prob_drop": 0.0},
        {"kind": "random", "draw": 1, "neurons": 4, "forget_drop": 0.2, "retain_drop": 0.3,
         "forget_prob_drop": 0.0, "retain_prob_drop": 0.0},
        {"kind": "retain_critical", "draw": 0, "neurons": 4, "forget_drop": 0.1, "retain_drop": -0.05,
         "forget_prob_drop": 0.0, "retain_prob_drop": 0.0},
    ])
    summary = summarise(sets).set_index("kind")
    assert summary.loc["critical", "selectivity"] == pytest.approx(6.0)
    assert summary.loc["random", "forget_drop"] == pytest.approx(0.15)
    assert summary.loc["random", "forget_drop_std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert summary.loc["random", "selectivity"] == pytest.approx(0.15 / 0.2)
    assert summary.loc["critical", "forget_drop_over_random"] == pytest.approx(4.0)
    assert summary.loc["retain_critical", "selectivity"] == float("inf")  # spares the retain items


def test_holdout_split_is_disjoint_equal_sized_and_seeded():
    from simu_core.knockout import holdout_split

    split = holdout_split(11, 50, seed=0)
    assert len(split.forget_attributed) == 6 and len(split.forget_measured) == len(split.retain_measured) == 5
    assert len(split.retain_attributed) == 6  # an equally sized retain sample
    assert not set(split.forget_attributed) & set(split.forget_measured)
    assert not set(split.retain_attributed) & set(split.retain_measured)
    again = holdout_split(11, 50, seed=0)
    assert all(np.array_equal(getattr(split, name), getattr(again, name)) for name in
               ("forget_attributed", "forget_measured", "retain_attributed", "retain_measured"))
    assert not np.array_equal(holdout_split(11, 50, seed=1).forget_measured, split.forget_measured)
    # attribution.max_items caps the attributed half (and its retain sample); knockout.max_items the measured parts.
    capped = holdout_split(40, 360, seed=0, attribute_limit=6, measure_limit=8)
    assert [len(capped.forget_attributed), len(capped.retain_attributed)] == [6, 6]
    assert [len(capped.forget_measured), len(capped.retain_measured)] == [8, 8]
    # Few retain items: both sides measure as many as the retain split has left.
    few = holdout_split(20, 13, seed=0)
    assert [len(few.retain_attributed), len(few.forget_measured), len(few.retain_measured)] == [10, 3, 3]
    with pytest.raises(ValueError, match="at least 2 forget items"):
        holdout_split(1, 50, seed=0)
    with pytest.raises(ValueError, match="the retain split has 10"):
        holdout_split(20, 10, seed=0)


def test_the_stage_measures_items_the_critical_set_was_not_chosen_on(trained_small, tmp_path, one_torch_thread):
    from simu_core.attribution import attribute_neurons
    from simu_core.config import load_config
    from simu_core.finetune import encode_frame
    from simu_core.prompting import pad_token_id
    from simu_core.stages import knockout, load_trained, read_benchmark
    from simu_core.thresholding import select_mask

    from conftest import SMALL_OVERRIDES

    config = load_config(overrides=SMALL_OVERRIDES + ["knockout.random_draws=2", "knockout.curve_sizes=[1]"])
    summary = knockout(config, trained_small["data"], trained_small["target"], tmp_path, progress=False)
    items = pd.read_parquet(tmp_path / "knockout_items.parquet")
    benchmark = read_benchmark(trained_small["data"])
    forget_size = len(benchmark["forget"])
    for split in ("forget", "retain"):
        roles = items[items["split"] == split].groupby("role")["item_id"].apply(set)
        assert not roles["attributed"] & roles["measured"], split
    measured = items[items["role"] == "measured"]["split"].value_counts()
    assert measured["forget"] == measured["retain"] == forget_size // 2
    assert summary["knockout_forget_items"] == summary["knockout_retain_items"] == forget_size // 2
    assert summary["knockout_attributed_forget_items"] == summary["knockout_attributed_retain_items"] == \
        forget_size - forget_size // 2
    # The critical set is the one the attributed items give, by the run's mask settings.
    model, tokenizer = load_trained(trained_small["target"], config)
    attributed = {}
    for split in ("forget", "retain"):
        ids = set(items[(items["split"] == split) & (items["role"] == "attributed")]["item_id"])
        frame = benchmark[split][benchmark[split]["item_id"].astype(str).isin(ids)]
        attributed[split] = attribute_neurons(model, encode_frame(tokenizer, frame, config.model.max_length),
                                              pad_token_id(tokenizer), mode=config.attribution.mode,
                                              steps=config.attribution.steps, batch_size=config.attribution.batch_size,
                                              progress=False)
    expected = select_mask(attributed["forget"], attributed["retain"], threshold=config.mask.threshold)
    mask = pd.read_parquet(tmp_path / "knockout_mask.parquet")
    assert mask["critical_forget"].tolist() == expected.table()["critical_forget"].tolist()
    sets = pd.read_parquet(tmp_path / "knockout.parquet").set_index("kind")
    assert sets.loc["critical", "neurons"] == expected.critical_forget.total() > 0
