"""Quantization attack's core: torchao's weight-only quantize-dequantize of every linear layer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from simu_core.attacks.quantize import (
    QUANTIZATION_BITS,
    QUANTIZATION_SCHEMES,
    check_group_size,
    check_quantization,
    linear_layer_names,
    quantize_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUP = 32
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 63, 0, 7]])
# The schemes whose grid holds a group exactly (torchao's "symmetric" clips the group's largest weight).
LOSSLESS_SCHEMES = ("asymmetric", "symmetric_no_clipping")


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def bounds(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    return weight.reshape(rows, columns // size, size)


def reference_scale_and_zero(groups: torch.Tensor, bits: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point, written out from torchao's ``choose_qparams_affine``
    (quant_primitives.py, 0.18): the range always includes 0; symmetric maps ``max(-lo, hi)`` onto
    half the integer range, ``(qmax - qmin) / 2``; the no-clipping variant picks the larger of
    ``lo / qmin`` and ``hi / qmax``; asymmetric spreads ``hi - lo`` over it with an integer zero point."""
    qmin, qmax = bounds(bits)
    lo = groups.amin(-1, keepdim=True).clamp(max=0)
    hi = groups.amax(-1, keepdim=True).clamp(min=0)
    eps = torch.finfo(groups.dtype).smallest_normal
    if scheme == "symmetric":
        return (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps), torch.zeros_like(lo)
    if scheme == "symmetric_no_clipping":
        return torch.maximum(lo / qmin, hi / qmax).clamp(min=eps), torch.zeros_like(lo)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def reference_fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, scheme: str) -> torch.Tensor:
    """Round to nearest (half to even) on the per-group grid, clamped to the integer range, then back."""
    qmin, qmax = bounds(bits)
    groups = grouped(weight, group_size)
    scale, zero = reference_scale_and_zero(groups, bits, scheme)
    # torchao multiplies by the reciprocal of the scale (quantize_affine), so do the same.
    q = (torch.round(groups * (1.0 / scale)) + zero).clamp(qmin, qmax)
    return ((q - zero) * scale).reshape(weight.shape)


def make_representable(model: nn.Module, bits: int, group_size: int | None, seed: int = 0) -> None:
    """Set every Linear weight to integers times a power-of-two scale per group, each group holding
    both ends of the ``bits``-bit integer range: the grid of the lossless schemes, exactly."""
    qmin, qmax = bounds(bits)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in linears(model).values():
            shape = grouped(module.weight, group_size).shape
            q = torch.randint(qmin, qmax + 1, shape, generator=generator)
            q[..., 0], q[..., 1] = qmin, qmax
            scale = 2.0 ** -torch.randint(8, 12, (*shape[:2], 1), generator=generator).float()
            module.weight.copy_((q * scale).reshape(module.weight.shape))


@pytest.mark.parametrize("group_size", [GROUP, None])
@pytest.mark.parametrize("bits", QUANTIZATION_BITS)
@pytest.mark.parametrize("scheme", LOSSLESS_SCHEMES)
def test_representable_weights_are_unchanged(scheme, bits, group_size):
    model = tiny_llama()
    make_representable(model, bits, group_size)
    quantized = quantize_weights(model, bits, group_size, scheme)
    for name, module in linears(model).items():
        assert torch.equal(linears(quantized)[name].weight, module.weight), name
    with torch.no_grad():
        assert torch.equal(quantized(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("bits", QUANTIZATION_BITS)
def test_symmetric_clips_each_groups_largest_weight_by_half_a_step(bits):
    # torchao's symmetric grid ends half a step short of max|w| on the positive side (the same grid as
    # GPTQ's symmetric RTN): a group whose largest weight is positive loses half a step there.
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    with torch.no_grad():
        weight.abs_()  # every group's largest magnitude is now a positive weight
    quantized = quantize_weights(model, bits, GROUP, "symmetric").model.layers[0].mlp.down_proj.weight.detach()
    groups, after = grouped(weight, GROUP), grouped(quantized, GROUP)
    top = groups.argmax(-1, keepdim=True)
    largest, moved = groups.gather(-1, top), after.gather(-1, top)
    half_step = largest / (2 ** bits - 1)  # scale / 2 with scale = max|w| / ((2^b - 1) / 2)
    # A difference of two nearly equal floats: its rounding error scales with the weight, not the step.
    assert ((largest - moved - half_step).abs() <= largest * 1e-6).all()
    make_representable(model, bits, GROUP)
    assert not torch.equal(quantize_weights(model, bits, GROUP, "symmetric").model.layers[0].mlp.down_proj.weight,
                           model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("group_size", [GROUP, None])
@pytest.mark.parametrize("scheme", QUANTIZATION_SCHEMES)
def test_four_bits_move_weights_more_than_eight_and_eight_stay_within_half_a_step(scheme, group_size):
    model = tiny_llama(seed=1)
    errors = {}
    for bits in QUANTIZATION_BITS:
        quantized = quantize_weights(model, bits, group_size, scheme)
        errors[bits] = {name: (linears(quantized)[name].weight - module.weight).detach().abs()
                        for name, module in linears(model).items()}
        with torch.no_grad():
            errors[bits]["logits"] = (quantized(IDS).logits - model(IDS).logits).abs()
        for name, module in linears(model).items():
            # Round to nearest on a grid that spans the group: at most half a step (its scale) off, up to
            # float32 rounding of the weight itself (symmetric's clipped maximum is off by exactly half).
            groups = grouped(module.weight.detach(), group_size)
            half_step = reference_scale_and_zero(groups, bits, scheme)[0] / 2
            excess = grouped(errors[bits][name], group_size) - half_step * (1 + 1e-5) - groups.abs() * 1e-6
            assert excess.max() <= 0, (bits, name, excess.max())
    for name in errors[8]:
        assert errors[4][name].mean() > 4 * errors[8][name].mean(), name
        assert errors[4][name].max() > errors[8][name].max() > 0, name


@pytest.mark.parametrize("group_size", [GROUP, 16, None])
@pytest.mark.parametrize("bits", QUANTIZATION_BITS)
@pytest.mark.parametrize("scheme", QUANTIZATION_SCHEMES)
def test_weights_match_an_independent_round_to_nearest(scheme, bits, group_size):
    model = tiny_llama(seed=2)
    quantized = quantize_weights(model, bits, group_size, scheme)
    for name, module in linears(model).items():
        expected = reference_fake_quantize(module.weight.detach(), bits, group_size, scheme)
        scale = reference_scale_and_zero(grouped(module.weight.detach(), group_size), bits, scheme)[0]
        torch.testing.assert_close(linears(quantized)[name].weight.detach(), expected,
                                   rtol=0, atol=float(scale.max()) * 1e-5, msg=f"{name}: {scheme} {bits} bits")


@pytest.mark.parametrize("scheme", QUANTIZATION_SCHEMES)
def test_weights_equal_torchao_intx_weight_only_config(scheme):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, quantize_

    mapping = {"symmetric": MappingType.SYMMETRIC, "asymmetric": MappingType.ASYMMETRIC,
               "symmetric_no_clipping": MappingType.SYMMETRIC_NO_CLIPPING_ERR}[scheme]
    model = tiny_llama(seed=3)
    for bits in QUANTIZATION_BITS:
        for group_size, granularity in ((GROUP, PerGroup(GROUP)), (None, PerAxis(0))):
            ours = quantize_weights(model, bits, group_size, scheme)
            theirs = tiny_llama(seed=3)
            quantize_(theirs, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity,
                                                   mapping_type=mapping))
            for name, module in linears(theirs).items():
                assert torch.equal(linears(ours)[name].weight, module.weight.dequantize()), (bits, group_size, name)


def test_input_untouched_and_copy_plain():
    model = tiny_llama(seed=4)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        logits = model(IDS).logits
    quantized = quantize_weights(model, 4, GROUP, "asymmetric")

    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert all(type(module) is nn.Linear for module in linears(model).values())
    assert linear_layer_names(quantized) == list(linears(model)) and len(linears(model)) == 2 * 7 + 1
    for name, module in linears(quantized).items():
        assert type(module) is nn.Linear and "extra_repr" not in vars(module), name
        assert type(module.weight) is nn.Parameter and type(module.weight.data) is torch.Tensor, name
        assert module.weight.dtype == torch.float32 and module.weight is not parameters[f"{name}.weight"], name
        assert module.weight.requires_grad == parameters[f"{name}.weight"].requires_grad, name
    assert torch.equal(quantized.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(quantized.model.norm.weight, model.model.norm.weight)

    # Forward passes, hooks and generate run unchanged on the copy; its logits moved.
    seen = []
    handle = quantized.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: seen.append(args[2].shape))
    with torch.no_grad():
        moved = quantized(IDS).logits
    handle.remove()
    assert seen == [torch.Size([2, 8, 32])] and not torch.equal(moved, logits)
    out = quantized.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_model_dtype_is_kept():
    model = tiny_llama(seed=5).to(torch.bfloat16)
    quantized = quantize_weights(model, 4, GROUP, "symmetric")
    for name, module in linears(quantized).items():
        assert module.weight.dtype == torch.bfloat16, name
    with torch.no_grad():
        assert quantized(IDS).logits.dtype == torch.bfloat16


def test_tied_output_layer_is_untied_and_the_embedding_kept(tmp_path):
    model = tiny_llama(seed=6, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    quantized = quantize_weights(model, 4, GROUP, "symmetric")

    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(quantized.model.embed_tokens.weight, embedding)
    assert torch.equal(quantized.lm_head.weight, reference_fake_quantize(embedding, 4, GROUP, "symmetric"))
    assert quantized.lm_head.weight is not quantized.model.embed_tokens.weight
    assert not quantized.config.tie_word_embeddings

    # Hugging Face does not tie them again: neither tie_weights() nor a save and reload.
    quantized.tie_weights()
    assert quantized.lm_head.weight is not quantized.model.embed_tokens.weight
    quantized.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, quantized.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, embedding)


def test_linear_layers_sharing_a_weight_still_share_it():
    torch.manual_seed(7)
    shared = nn.Linear(32, 32, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), shared)
    quantized = quantize_weights(model, 8, GROUP, "symmetric")
    assert quantized[0].weight is quantized[4].weight and quantized[0].weight is not shared.weight
    assert torch.equal(quantized[2].bias, model[2].bias)  # biases are not quantized


def test_gpt2_conv1d_layers_are_quantized_along_their_input_features():
    torch.manual_seed(8)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    quantized = quantize_weights(model, 4, GROUP, "asymmetric")
    modules = dict(quantized.named_modules())
    convs = {name: module for name, module in model.named_modules() if isinstance(module, Conv1D)}
    assert len(convs) == 2 * 4 and set(linear_layer_names(model)) == set(convs) | {"lm_head"}
    for name, module in convs.items():
        weight = module.weight.detach()  # [in, out]
        expected = reference_fake_quantize(weight.t().contiguous(), 4, GROUP, "asymmetric").t()
        assert type(modules[name]) is Conv1D
        torch.testing.assert_close(modules[name].weight.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(quantized.transformer.wte.weight, model.transformer.wte.weight)
    assert not torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        quantized(IDS)


@pytest.mark.parametrize("bits", QUANTIZATION_BITS)
@pytest.mark.parametrize("group_size", [None, 1, 32, 128])
@pytest.mark.parametrize("scheme", QUANTIZATION_SCHEMES)
def test_offered_settings_pass(bits, group_size, scheme):
    check_quantization(bits, group_size, scheme)


@pytest.mark.parametrize(
    ("bits", "group_size", "scheme", "field", "offered"),
    [
        (3, GROUP, "symmetric", "attack.quantize.bits", "[8, 4]"),
        (16, GROUP, "symmetric", "attack.quantize.bits", "[8, 4]"),
        (8.0, GROUP, "symmetric", "attack.quantize.bits", "[8, 4]"),
        (True, GROUP, "symmetric", "attack.quantize.bits", "[8, 4]"),
        (8, 0, "symmetric", "attack.quantize.group_size", "a positive integer"),
        (8, -32, "symmetric", "attack.quantize.group_size", "a positive integer"),
        (8, 32.0, "symmetric", "attack.quantize.group_size", "None"),
        (4, GROUP, "nf4", "attack.quantize.scheme", "'symmetric', 'asymmetric', 'symmetric_no_clipping'"),
        (4, GROUP, "Symmetric", "attack.quantize.scheme", "'symmetric'"),
    ],
)
def test_settings_not_offered_are_refused_naming_the_field(bits, group_size, scheme, field, offered):
    with pytest.raises(ValueError, match=field) as refused:
        check_quantization(bits, group_size, scheme)
    assert offered in str(refused.value)
    with pytest.raises(ValueError, match=field):
        quantize_weights(tiny_llama(), bits, group_size, scheme)


@pytest.mark.parametrize("group_size", [24, 64])
def test_group_size_that_does_not_divide_a_layer_is_refused(group_size):
    model = tiny_llama()  # 32 input features everywhere but the MLP down projections (64)
    check_group_size(model, 16)
    check_group_size(model, None)
    with pytest.raises(ValueError, match=rf"attack.quantize.group_size={group_size} does not divide") as refused:
        quantize_weights(model, 8, group_size, "symmetric")
    assert "model.layers.0.self_attn.q_proj (32)" in str(refused.value)
    assert "down_proj" not in str(refused.value) or group_size == 24


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="has no nn.Linear"):
        quantize_weights(nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4)), 8, None, "symmetric")


def test_importing_the_module_does_not_import_torch():
    # simu_core.config validates attack.quantize with check_quantization when it is imported.
    code = "import sys, simu_core.attacks.quantize, simu_core.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
