"""Logit lens attack: per-layer answer probabilities read through the final norm and unembedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from simu_core.attacks.logit_lens import (
    TABLE_COLUMNS,
    final_norm_and_unembedding,
    layer_answer_probabilities,
    lens_summary,
)
from simu_core.config import EvalConfig
from simu_core.evaluation.qa import answer_probabilities
from simu_core.models.tiny import train_tokenizer
from simu_core.prompting import IGNORE_INDEX, encode_qa

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = 3
MAX_LENGTH = 64
# A wide initialisation: peaked, item-dependent distributions make the comparisons sharper than
# the near-uniform outputs of the default 0.02.
INIT = 0.2


def _builders(vocab: int) -> dict:
    llama_like = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      initializer_range=INIT)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**llama_like)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_inner=64, n_layer=LAYERS, n_head=4,
                                                   n_positions=128, initializer_range=INIT)),
        # OLMo's final norm has no parameters.
        "olmo": lambda: OlmoForCausalLM(OlmoConfig(**llama_like)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            max_position_embeddings=128, initializer_range=INIT)),
        # An embedding narrower than the model: the read-out goes through OPT's project_out.
        "opt": lambda: OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, max_position_embeddings=128, dropout=0.0, init_std=INIT)),
        # Post-norm OPT (as OPT-350m): no final norm, its layer outputs are already normalised.
        "opt_post_norm": lambda: OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, max_position_embeddings=128, dropout=0.0, init_std=INIT,
            do_layer_norm_before=False)),
    }


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Question: Where did writer {i} live?\nAnswer: Writer {i} lived in {'a big ' * (i % 4)}city."
             for i in range(40)]
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def items() -> pd.DataFrame:
    # Varied prompt and answer lengths, so that batches of 3 need padding.
    return pd.DataFrame({
        "item_id": [f"q{i}" for i in range(5)],
        "question": [f"Where did {'the famous ' * (i % 3)}writer {i} live?" for i in range(5)],
        "answer": [f"Writer {i} lived in {'a big ' * (i % 4)}city." for i in range(5)],
    })


def _model(tokenizer, architecture: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _builders(len(tokenizer))[architecture]().eval()


def _by_hand(model, tokenizer, question: str, answer: str, layer: int) -> float:
    """Mean answer-token NLL read from decoder layer ``layer`` (< L-1) of one unpadded item."""
    example = encode_qa(tokenizer, question, answer, MAX_LENGTH)
    input_ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        # hidden_states[0] is the embedding output, hidden_states[l + 1] decoder layer l's output
        # (the last entry is already normalised, hence l < L-1 here).
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[layer + 1]
        norm, unembedding = final_norm_and_unembedding(model)
        logprobs = torch.log_softmax(unembedding(norm(hidden)).float(), dim=-1)[0, :-1]
    labels = torch.tensor(example.labels[1:])
    scored = labels != IGNORE_INDEX
    return float(-logprobs[scored].gather(-1, labels[scored].unsqueeze(-1)).mean())


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_last_layer_equals_model_probability(tokenizer, items, architecture, batch_size):
    model = _model(tokenizer, architecture)
    config = EvalConfig(batch_size=batch_size)
    table = layer_answer_probabilities(model, tokenizer, items, config, max_length=MAX_LENGTH)
    last = table[table["layer"] == LAYERS - 1]
    assert list(last["item_id"]) == list(items["item_id"])
    own = answer_probabilities(model, tokenizer, items, config, max_length=MAX_LENGTH)
    np.testing.assert_allclose(last["probability"].to_numpy(), own, rtol=0, atol=1e-6)
    # Random models give probabilities near 1/V: relative agreement too.
    np.testing.assert_allclose(last["probability"].to_numpy(), own, rtol=1e-5)
    # Padding changes nothing: every layer as scored one item at a time.
    single = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=1), max_length=MAX_LENGTH)
    np.testing.assert_allclose(table["nll"].to_numpy(), single["nll"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_intermediate_layers_equal_a_hand_computation(tokenizer, items, architecture):
    model = _model(tokenizer, architecture, seed=1)
    table = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=3), max_length=MAX_LENGTH)
    for row, item in enumerate(items.itertuples(index=False)):
        for layer in range(LAYERS - 1):
            expected = _by_hand(model, tokenizer, item.question, item.answer, layer)
            got = table[(table["item_id"] == item.item_id) & (table["layer"] == layer)]
            assert len(got) == 1
            np.testing.assert_allclose(got["nll"].iloc[0], expected, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got["probability"].iloc[0], np.exp(-expected), rtol=0, atol=1e-6)
    # The layers do differ (the lens is not reading the same state everywhere).
    assert table.groupby("layer")["nll"].mean().nunique() == LAYERS


@pytest.mark.parametrize("architecture", ["olmo", "gpt_neox", "opt", "opt_post_norm"])
def test_other_architectures_last_layer_equals_model_probability(tokenizer, items, architecture):
    model = _model(tokenizer, architecture)
    config = EvalConfig(batch_size=3)
    table = layer_answer_probabilities(model, tokenizer, items, config, max_length=MAX_LENGTH)
    own = answer_probabilities(model, tokenizer, items, config, max_length=MAX_LENGTH)
    np.testing.assert_allclose(table[table["layer"] == LAYERS - 1]["probability"].to_numpy(), own, rtol=0, atol=1e-6)


def test_table_layout_and_summary(tokenizer, items):
    model = _model(tokenizer, "llama", seed=2)
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        table = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=2), max_length=MAX_LENGTH)
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward pass per batch of 2 (5 items), not one per layer
    assert tuple(table.columns) == TABLE_COLUMNS
    assert len(table) == LAYERS * len(items)
    assert list(table["item_id"]) == [item for item in items["item_id"] for _ in range(LAYERS)]
    assert list(table["layer"]) == list(range(LAYERS)) * len(items)
    np.testing.assert_allclose(table["probability"], np.exp(-table["nll"]), rtol=1e-12)
    assert ((table["probability"] > 0) & (table["probability"] <= 1)).all()

    summary = lens_summary(table)
    means = [float(np.mean(table["probability"].to_numpy()[layer::LAYERS])) for layer in range(LAYERS)]
    assert set(summary) == {f"lens_prob_layer_{layer}" for layer in range(LAYERS)} | {"lens_prob_max",
                                                                                        "lens_max_layer"}
    for layer in range(LAYERS):
        assert summary[f"lens_prob_layer_{layer}"] == pytest.approx(means[layer], rel=1e-12)
    assert summary["lens_prob_max"] == pytest.approx(max(means), rel=1e-12)
    assert summary["lens_max_layer"] == float(int(np.argmax(means)))


def test_summary_finds_an_intermediate_maximum():
    table = pd.DataFrame({
        "item_id": ["a"] * 4 + ["b"] * 4,
        "layer": [0, 1, 2, 3] * 2,
        "probability": [0.1, 0.6, 0.3, 0.05, 0.3, 0.2, 0.5, 0.15],
        "nll": 0.0,
    })
    summary = lens_summary(table)
    # Per-layer means 0.2, 0.4, 0.4, 0.1: the maximum is an intermediate layer, the first on a tie.
    assert summary["lens_prob_layer_3"] == pytest.approx(0.1)
    assert summary["lens_prob_max"] == pytest.approx(0.4)
    assert summary["lens_max_layer"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        lens_summary(table.iloc[:0])


def test_training_mode_restored_and_bfloat16_read_in_float32(tokenizer, items):
    model = _model(tokenizer, "llama")
    expected = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=3), max_length=MAX_LENGTH)
    model.train()
    again = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=3), max_length=MAX_LENGTH)
    assert model.training
    np.testing.assert_allclose(again["nll"], expected["nll"], rtol=0, atol=1e-9)

    model.eval().to(torch.bfloat16)
    low = layer_answer_probabilities(model, tokenizer, items, EvalConfig(batch_size=3), max_length=MAX_LENGTH)
    # The model is left in bfloat16 (the float32 read-out works on copies), the numbers near float32's.
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert np.isfinite(low["nll"]).all()
    np.testing.assert_allclose(low["nll"], expected["nll"], rtol=0.1)


def test_unknown_architecture_names_the_class(tokenizer, items):
    class MysteryLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.ModuleList([nn.Linear(4, 4)])
            self.head = nn.Linear(4, 8)

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    with pytest.raises(ValueError, match="MysteryLM"):
        final_norm_and_unembedding(MysteryLM())
    with pytest.raises(ValueError, match="MysteryLM"):
        layer_answer_probabilities(MysteryLM(), tokenizer, items, EvalConfig(), max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="lack columns"):
        layer_answer_probabilities(_model(tokenizer, "llama"), tokenizer, items.drop(columns=["answer"]),
                                   EvalConfig(), max_length=MAX_LENGTH)


@pytest.mark.parametrize("architecture, norm_path", [
    ("llama", "model.norm"), ("gpt2", "transformer.ln_f"), ("gpt_neox", "gpt_neox.final_layer_norm"),
])
def test_final_norm_is_the_models_own(tokenizer, architecture, norm_path):
    model = _model(tokenizer, architecture)
    norm, unembedding = final_norm_and_unembedding(model)
    assert norm is model.get_submodule(norm_path)
    assert unembedding is model.get_output_embeddings()
