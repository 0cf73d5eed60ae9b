"""Critical-neuron attribution (SIMU step 1): closed form, completeness, planted neuron, every
architecture, bad input, Parquet metadata, and the attribute stage on the small trained target."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import model_factory
from simu_core.attribution import (
    METADATA_KEY,
    AttributionResult,
    attribute_neurons,
    attribution_table,
    data_identity,
    model_identity,
    read_scores,
    scores_from_table,
    write_scores,
)
from simu_core.models.adapter import ArchitectureAdapter, UnsupportedArchitectureError
from simu_core.prompting import IGNORE_INDEX, EncodedExample


def qa(prompt: list[int], answer: list[int]) -> EncodedExample:
    return EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def random_examples(count: int = 3, seed: int = 0, vocab: int = model_factory.VOCAB) -> list[EncodedExample]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7, 4), (4, 2), (6, 3)][:count]
    return [
        qa(torch.randint(3, vocab, (n,), generator=generator).tolist(),
           torch.randint(3, vocab, (a,), generator=generator).tolist())
        for n, a in shapes
    ]


# ----------------------------------------------------------------------------------------------
# a network whose answer is analytic


class _Holder(nn.Module):
    pass


class AnalyticLM(nn.Module):
    """One 'layer', no attention: beta[t] = table[input_ids[t]], logits[t] = W @ beta[t].

    Laid out like a Llama (model.layers[0].mlp.down_proj, self_attn.*_proj) so the adapter finds
    it; the attention projections exist but are unused. With two tokens,
    F = log softmax(W a)[y] = log sigmoid(w . a), w = W[y] - W[1 - y], so
    dF/da = sigmoid(-w . a) * w and the m-step attribution has the closed form
    Att_k = beta_k * w_k * (1/m) sum_j sigmoid(-(j/m) w . beta).
    """

    def __init__(self, table: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(table)
        layer = _Holder()
        layer.mlp = _Holder()
        layer.mlp.down_proj = nn.Linear(table.shape[1], weight.shape[0], bias=False)
        layer.mlp.down_proj.weight.data.copy_(weight)
        layer.self_attn = _Holder()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, nn.Linear(1, 1))
        self.model = _Holder()
        self.model.layers = nn.ModuleList([layer])

    def forward(self, input_ids, attention_mask=None, **kwargs):
        beta = self.table(input_ids)
        return SimpleNamespace(logits=self.model.layers[0].mlp.down_proj(beta))


def closed_form(table: np.ndarray, weight: np.ndarray, examples: list[EncodedExample], steps: int) -> np.ndarray:
    scores = np.zeros(table.shape[1])
    for example in examples:
        for t in range(1, len(example.labels)):
            y = example.labels[t]
            if y == IGNORE_INDEX:
                continue
            beta = table[example.input_ids[t - 1]]
            w = weight[y] - weight[1 - y]
            z = w @ beta
            mean_sigmoid = np.mean([1.0 / (1.0 + np.exp((j / steps) * z)) for j in range(1, steps + 1)])
            scores += beta * w * mean_sigmoid
    return scores


@pytest.mark.filterwarnings("ignore:fast attribution could not isolate")  # tested below
@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_m_step_attribution_equals_closed_form(mode, steps):
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(2, 4, generator=generator, dtype=torch.float64).float()
    weight = (2 * torch.randn(2, 4, generator=generator, dtype=torch.float64)).float()
    model = AnalyticLM(table, weight)
    examples = [qa([0, 1], [0, 1, 1]), qa([1], [1, 0])]
    result = attribute_neurons(model, examples, pad_token_id=0, mode=mode, steps=steps, progress=False)
    expected = closed_form(table.double().numpy(), weight.double().numpy(), examples, steps)
    assert result.num_samples == 5 and result.num_examples == 2
    if mode == "fast":  # no HF attention interface here (and no attention to isolate): recorded
        assert result.metadata["isolation"] == "none"
    np.testing.assert_allclose(result.scores[0], expected, rtol=1e-5, atol=1e-7)


def test_fast_mode_warns_when_it_cannot_isolate_positions():
    model = AnalyticLM(torch.ones(2, 4), torch.ones(2, 4))
    with pytest.warns(RuntimeWarning, match="could not isolate answer positions for AnalyticLM"):
        attribute_neurons(model, [qa([0], [1, 1])], 0, mode="fast", steps=2, progress=False)


# ----------------------------------------------------------------------------------------------
# completeness


def _spiky_llama(seed: int = 0) -> nn.Module:
    """The tiny Llama with larger weights, so that one layer's activations move F by O(0.1-1)."""
    model = model_factory.build("llama", seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.25)
    return model


def _objective(model, example: EncodedExample, zero_layer: int | None, positions: list[int],
               targets: list[int] | None = None) -> float:
    """Summed log-prob of the answer tokens at ``targets`` (default: all), with layer
    ``zero_layer``'s activation zeroed at ``positions``."""
    adapter = ArchitectureAdapter(model)
    ids = torch.tensor([example.input_ids])
    handle = None
    if zero_layer is not None:
        def hook(module, args):
            x = args[0].clone()
            x[0, positions] = 0
            return (x,)
        handle = adapter.layers[zero_layer].down.module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    finally:
        if handle is not None:
            handle.remove()
    if targets is None:
        targets = [t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]
    return float(sum(logprobs[t - 1, example.labels[t]] for t in targets))


# The m-step sum is a right-endpoint Riemann sum of the path integral, so it converges to
# F(beta) - F(0) as O(1/m). Stated tolerance: at m = 100 within 10% of |dF| (first order), and the
# Richardson extrapolation 2 * S_2m - S_m (error O(1/m^2)) within 0.5% of |dF| + 1e-4, which shows
# the sums converge to exactly F(beta) - F(0) and not to something near it.
COMPLETENESS_STEPS = 50


def _check_complete(coarse: float, fine: float, delta: float) -> None:
    assert abs(delta) > 1e-2  # the check is not vacuous
    assert fine == pytest.approx(delta, rel=0.10)
    assert 2 * fine - coarse == pytest.approx(delta, rel=5e-3, abs=1e-4)


def test_completeness_reference_mode_per_sample():
    model = _spiky_llama()
    # One answer token per item, so one item = one reference sample.
    samples = [qa([5, 17, 33, 8], [41]), qa([9, 60, 12], [77])]
    for example in samples:
        coarse, fine = (
            attribute_neurons(model, [example], 0, mode="reference", steps=steps, progress=False)
            for steps in (COMPLETENESS_STEPS, 2 * COMPLETENESS_STEPS)
        )
        p = len(example.input_ids) - 2  # the predicting position
        full = _objective(model, example, None, [])
        for layer in range(len(fine.scores)):
            delta = full - _objective(model, example, layer, [p])
            _check_complete(coarse.scores[layer].sum(), fine.scores[layer].sum(), delta)


def test_completeness_fast_mode_sums_the_per_sample_deltas():
    # Fast mode isolates the answer positions, so its scores sum, per layer, to the reference's
    # per-sample deltas added over the item's answer tokens (each with only its own position zeroed).
    model = _spiky_llama(seed=1)
    example = qa([5, 17, 33], [41, 8, 60])
    coarse, fine = (
        attribute_neurons(model, [example], 0, mode="fast", steps=steps, progress=False)
        for steps in (COMPLETENESS_STEPS, 2 * COMPLETENESS_STEPS)
    )
    targets = [t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]
    for layer in range(len(fine.scores)):
        delta = sum(
            _objective(model, example, None, [], [t]) - _objective(model, example, layer, [t - 1], [t])
            for t in targets
        )
        _check_complete(coarse.scores[layer].sum(), fine.scores[layer].sum(), delta)


# ----------------------------------------------------------------------------------------------
# planted neuron


PLANTED_LAYER, PLANTED_NEURON, ANSWER_TOKEN = 0, 37, 7


def _planted_llama() -> nn.Module:
    """Tiny Llama where neuron 37 of layer 0 writes the answer token's unembedding direction.

    Every token embedding shares a component on coordinate 0; the neuron's gate and up rows read
    that coordinate, so its activation silu(z) * z is large and positive at every position; its
    down-projection column is a unit direction u (orthogonal to coordinate 0) and the answer
    token's LM-head row is u too: the neuron alone makes the model say token 7 (p ~ 0.5, not
    saturated, so gradients along the path are informative). Everything else keeps its small
    random initialisation.
    """
    model = model_factory.build("llama", seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 1.0
        mlp = model.model.layers[PLANTED_LAYER].mlp
        for projection in (mlp.gate_proj, mlp.up_proj):
            projection.weight[PLANTED_NEURON] = 0.0
            projection.weight[PLANTED_NEURON, 0] = 1.0
        u = torch.randn(model_factory.HIDDEN, generator=torch.Generator().manual_seed(5))
        u[0] = 0.0
        u /= u.norm()
        model.lm_head.weight[ANSWER_TOKEN] = u
        mlp.down_proj.weight[:, PLANTED_NEURON] = 0.05 * u
    return model


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_planted_neuron_is_ranked_first(mode):
    model = _planted_llama()
    generator = torch.Generator().manual_seed(11)
    forget = [qa(torch.randint(10, 96, (n,), generator=generator).tolist(), [ANSWER_TOKEN] * 3) for n in (4, 6, 5)]
    # Sanity: the planted model does say the answer token.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([forget[0].input_ids])).logits[0, len(forget[0].input_ids) - 4]
    assert int(logits.argmax()) == ANSWER_TOKEN and 0.3 < float(torch.softmax(logits, -1)[ANSWER_TOKEN]) < 0.9
    result = attribute_neurons(model, forget, 0, mode=mode, steps=5, progress=False)
    flat = np.concatenate(result.scores)
    best = int(np.argmax(flat))
    assert divmod(best, model_factory.FF) == (PLANTED_LAYER, PLANTED_NEURON)
    assert flat[best] > 0
    # And it stands out: the runner-up is far behind.
    assert np.sort(flat)[-2] < 0.2 * flat[best]


# ----------------------------------------------------------------------------------------------
# every architecture


@pytest.mark.parametrize("architecture", sorted(model_factory.BUILDERS))
def test_every_architecture_runs_and_fast_mode_equals_reference(architecture):
    model = model_factory.build(architecture)
    examples = random_examples()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    reference = attribute_neurons(model, examples, 0, mode="reference", steps=3, batch_size=4, progress=False)
    fast = attribute_neurons(model, examples, 0, mode="fast", steps=3, batch_size=2, progress=False)
    sizes = ArchitectureAdapter(model).neurons_per_layer()
    for result in (reference, fast):
        assert [len(layer) for layer in result.scores] == sizes == [model_factory.FF] * model_factory.LAYERS
        assert all(np.isfinite(layer).all() and np.abs(layer).max() > 0 for layer in result.scores)
        assert result.num_samples == sum(example.num_answer_tokens for example in examples)
    # Two-stream attention isolates the answer positions: fast mode computes the reference's numbers.
    assert fast.metadata["isolation"] == "two_stream"
    for layer in range(model_factory.LAYERS):
        np.testing.assert_allclose(fast.scores[layer], reference.scores[layer], rtol=1e-4,
                                   atol=1e-5 * np.abs(reference.scores[layer]).max())
    # Attribution leaves the model as it was: weights, requires_grad flags, no .grad, eval mode.
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.requires_grad == flags[name] and param.grad is None
    assert not model.training


def _fast_scores(model, examples, **options) -> list[np.ndarray]:
    from simu_core import attribution

    adapter = ArchitectureAdapter(model)
    scores = [torch.zeros(size, dtype=torch.float64) for size in adapter.neurons_per_layer()]
    with attribution._attribution_state(model):
        attribution._attribute_fast(model, adapter, examples, 0, 3, 2, list(range(adapter.num_layers)), scores,
                                    attribution.tqdm(disable=True), **options)
    return [layer.numpy() for layer in scores]


def test_fast_mode_layer_stubs_change_nothing_and_isolation_matters():
    model = model_factory.build("gpt2")
    examples = random_examples(4)
    with_stubs = _fast_scores(model, examples)
    without = _fast_scores(model, examples, reuse_lower_layers=False)
    for a, b in zip(with_stubs, without):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    # Without isolation (answer positions scaled jointly, plain attention) the lower layer's scores
    # move away from the reference's; the last layer cannot differ (no attention after it).
    joint = _fast_scores(model, examples, isolate_positions=False)
    assert np.abs(joint[0] - with_stubs[0]).max() > 1e-3 * np.abs(with_stubs[0]).max()
    np.testing.assert_allclose(joint[1], with_stubs[1], rtol=1e-4, atol=1e-6 * np.abs(with_stubs[1]).max())
    assert model.config._attn_implementation == "sdpa"  # restored


def test_deterministic_and_batch_size_independent():
    model = model_factory.build("qwen2")
    examples = random_examples(4)
    first = attribute_neurons(model, examples, 0, mode="reference", steps=2, batch_size=3, progress=False)
    again = attribute_neurons(model, examples, 0, mode="reference", steps=2, batch_size=3, progress=False)
    other = attribute_neurons(model, examples, 0, mode="reference", steps=2, batch_size=16, progress=False)
    for a, b, c in zip(first.scores, again.scores, other.scores):
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-7 * np.abs(a).max())


def test_layers_subset_scores_only_those_layers():
    model = model_factory.build("llama")
    examples = random_examples(2)
    full = attribute_neurons(model, examples, 0, mode="fast", steps=2, progress=False)
    only_last = attribute_neurons(model, examples, 0, mode="fast", steps=2, progress=False, layers=[1])
    assert not only_last.scores[0].any()
    np.testing.assert_allclose(only_last.scores[1], full.scores[1], rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_refused_with_clear_errors():
    model = model_factory.build("llama")
    examples = random_examples(1)
    for steps in (0, -2, 2.5):
        with pytest.raises(ValueError, match="steps m must be an integer >= 1"):
            attribute_neurons(model, examples, 0, steps=steps, progress=False)
    with pytest.raises(ValueError, match="item set is empty"):
        attribute_neurons(model, [], 0, progress=False)
    with pytest.raises(ValueError, match="no(ne of the .*)? answer token|has an answer token"):
        attribute_neurons(model, [EncodedExample([1, 2, 3], [IGNORE_INDEX] * 3)], 0, progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        attribute_neurons(model, examples, 0, mode="paper", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        attribute_neurons(model, examples, 0, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="layers must be"):
        attribute_neurons(model, examples, 0, layers=[5], progress=False)

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _Holder()
            layer = _Holder()
            layer.self_attn = _Holder()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(4, 4))
            layer.ffn = nn.Linear(4, 4)  # not a down projection the adapter knows
            self.model.layers = nn.ModuleList([layer])

    with pytest.raises(UnsupportedArchitectureError, match="MLP down projection") as caught:
        attribute_neurons(NoMLP(), examples, 0, progress=False)
    assert isinstance(caught.value, ValueError)


# ----------------------------------------------------------------------------------------------
# tables and metadata


def test_table_parquet_round_trip_with_metadata(tmp_path):
    forget = [np.array([0.5, -1.0, 2.0]), np.array([0.0, 3.0, 1.0])]
    retain = [np.array([1.0, 1.0, 1.0]), np.array([-1.0, 0.0, 0.5])]
    meta = {"mode": "fast", "steps": 5, "num_samples": 12, "model": {"down_proj_sha256": "abc"}}
    table = attribution_table(forget, retain, meta)
    assert list(table.columns) == ["layer", "neuron", "forget_score", "retain_score"]
    assert len(table) == 6 and table.attrs["attribution"] == meta
    path = write_scores(table, tmp_path / "scores.parquet")
    back, back_meta = read_scores(path)
    assert back_meta == meta
    import pyarrow.parquet as pq

    assert METADATA_KEY in pq.read_schema(path).metadata
    for column, expected in (("forget_score", forget), ("retain_score", retain)):
        for got, want in zip(scores_from_table(back, column), expected):
            np.testing.assert_array_equal(got, want)
    only_forget = attribution_table(AttributionResult(forget, "fast", 5, 1, 2, 0.0))
    assert only_forget["retain_score"].isna().all()
    with pytest.raises(ValueError, match="different shapes"):
        attribution_table(forget, [np.zeros(2), np.zeros(3)])


def test_identities_change_with_weights_and_tokens():
    model = model_factory.build("llama")
    identity = model_identity(model)
    assert identity["architecture"] == "LlamaForCausalLM" and identity["neurons_per_layer"] == [64, 64]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert model_identity(model)["down_proj_sha256"] != identity["down_proj_sha256"]
    examples = random_examples(2)
    assert data_identity(examples)["tokens_sha256"] == data_identity(list(examples))["tokens_sha256"]
    assert data_identity(examples)["tokens_sha256"] != data_identity(examples[:1])["tokens_sha256"]


# ----------------------------------------------------------------------------------------------
# the attribute stage on the small trained target


@pytest.mark.slow
def test_attribute_stage_writes_scores_with_metadata(trained_small, tmp_path):
    from simu_core.stages import SCORES_FILE, attribute

    config = trained_small["config"].model_copy(deep=True)
    config.attribution.steps = 2
    config.attribution.max_items = 4
    meta = {}
    for which in ("forget", "retain"):
        meta[which] = attribute(config, trained_small["data"], trained_small["target"], tmp_path / which, which,
                                progress=False)
        table, stored = read_scores(tmp_path / which / SCORES_FILE)
        assert stored == meta[which]
        assert list(table.columns) == ["layer", "neuron", "score"]
        assert len(table) == 2 * 256  # the small config: 2 layers x 256 neurons
        assert stored["which"] == which and stored["mode"] == config.attribution.mode and stored["steps"] == 2
        assert stored["num_examples"] == 4 and stored["data"]["num_items"] == 4
        assert np.isfinite(table["score"]).all() and table["score"].max() > 0
    assert meta["forget"]["model"] == meta["retain"]["model"]
    assert meta["forget"]["data"]["tokens_sha256"] != meta["retain"]["data"]["tokens_sha256"]
    # Deterministic: a rerun attributes the same items to the same scores.
    again = attribute(config, trained_small["data"], trained_small["target"], tmp_path / "again", "retain",
                      progress=False)
    assert again["data"] == meta["retain"]["data"]
    assert read_scores(tmp_path / "again" / SCORES_FILE)[0]["score"].equals(
        read_scores(tmp_path / "retain" / SCORES_FILE)[0]["score"]
    )


@pytest.mark.slow
def test_attribute_stage_on_lume_rows(trained_small, tmp_path):
    import pandas as pd

    from simu_core.stages import BENCHMARK_DIR, SCORES_FILE, attribute

    folder = tmp_path / "data" / BENCHMARK_DIR
    folder.mkdir(parents=True)
    rows = pd.DataFrame(
        {
            "id": [f"doc{i}sc1" for i in range(5)],
            "input": ["The author was born in", "Her first novel was", "He lives in", "The capital is", "She wrote"],
            "output": ["a small town", "about the sea", "a big city", "far away", "three books"],
            "task": ["Task1"] * 5,
            "kind": ["completion"] * 5,
            "split": ["forget", "forget", "retain", "retain", "retain"],
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    for name in ("mia_member", "mia_nonmember"):
        pd.DataFrame({"id": ["x"], "input": ["a"], "output": ["b"]}).to_parquet(folder / f"{name}.parquet", index=False)
    config = trained_small["config"].model_copy(deep=True)
    config.attribution.steps = 2
    config.data.benchmark = "lume"  # the stage encodes items as its benchmark's registry row says (LUME: input/output)
    forget = attribute(config, tmp_path / "data", trained_small["target"], tmp_path / "f", "forget", progress=False)
    retain = attribute(config, tmp_path / "data", trained_small["target"], tmp_path / "r", "retain", progress=False)
    assert forget["data"]["benchmark"] == "lume" and forget["num_examples"] == 2
    assert retain["num_examples"] == 2  # as many retain rows as forget rows, sampled with run.seed
    assert np.isfinite(read_scores(tmp_path / "r" / SCORES_FILE)[0]["score"]).all()
