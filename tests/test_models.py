"""Architecture adapter on tiny random models of every supported family; loading from a folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model_factory
from simu_core.models.adapter import ArchitectureAdapter, UnsupportedArchitectureError
from simu_core.models.loading import load_causal_lm, load_tokenizer, resolve_device
from simu_core.models.tiny import save_model, train_tokenizer


@pytest.mark.parametrize("architecture", sorted(model_factory.BUILDERS))
def test_adapter_finds_down_projection_and_attention(architecture):
    model = model_factory.build(architecture)
    adapter = ArchitectureAdapter(model)
    assert adapter.num_layers == model_factory.LAYERS
    assert adapter.neurons_per_layer() == [model_factory.FF] * model_factory.LAYERS
    for down in adapter.down_projections():
        # The neuron dimension of the weight has d_ff entries, the other d_model.
        assert down.weight.shape[down.neuron_dim] == model_factory.FF
        assert down.weight.shape[1 - down.neuron_dim] == model_factory.HIDDEN
        # Feeding the module a d_ff-wide input works: the activation enters along the neuron axis.
        assert down.module(torch.zeros(1, model_factory.FF)).shape[-1] == model_factory.HIDDEN
    names = [name for name, _ in adapter.attention_parameters()]
    assert names and all(("attn" in name or "attention" in name) for name in names)
    assert not any("mlp" in name for name in names)
    expected_neuron_dim = 0 if architecture == "gpt2" else 1
    assert adapter.down_projections()[0].neuron_dim == expected_neuron_dim


def test_unsupported_architecture_names_what_it_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])
            self.head = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitectureError, match="blocks"):
        ArchitectureAdapter(Odd())

    model = model_factory.build("llama")
    for layer in model.model.layers:
        layer.mlp = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="no an MLP down projection|down projection"):
        ArchitectureAdapter(model)


def test_save_and_load_local_folder(tmp_path):
    tokenizer = train_tokenizer(["hello world"] * 10, 280)
    model = model_factory.build("llama")
    model.resize_token_embeddings(len(tokenizer))
    save_model(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_causal_lm(tmp_path, dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    reloaded = load_tokenizer(tmp_path)
    assert reloaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    with pytest.raises(ValueError, match="model.dtype"):
        load_causal_lm(tmp_path, dtype="int3")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="run.device='cuda'"):
            resolve_device("cuda")


def test_adapter_finds_opt_modules():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128))
    adapter = ArchitectureAdapter(model)
    assert adapter.down_projections()[0].name == "model.decoder.layers.0.fc2"
    assert adapter.neurons_per_layer() == [64, 64]
    assert [name for name, _ in adapter.attention_parameters()][:2] == [
        "model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.q_proj.bias"]
