"""Quantization attack: is the forgotten knowledge removed, or only hidden below the quantization step?

Zhang et al. (ICLR 2025, arXiv 2410.16454) show that 4-bit weight quantization of an unlearned model
brings much of the forgotten knowledge back: unlearning moves the weights by less than a quantization
step, and rounding snaps them back to the target's grid point. :func:`quantize_weights` returns a copy
of a model whose every linear layer's weight is replaced by its quantize-dequantize ("fake-quantized")
value, so that every measure of the project runs on it unchanged.

The quantization is torchao's weight-only integer quantization (``IntxWeightOnlyConfig``, the
``IntxUnpackedToInt8Tensor`` it stores; round-to-nearest, no calibration), per group of
``group_size`` consecutive weights along a row (the input features), ``None`` for one group per
output row. With ``b`` bits, ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` and, per group, ``lo =
min(w.min(), 0)``, ``hi = max(w.max(), 0)``:

- ``symmetric`` (torchao's ``SYMMETRIC``, the same grid as GPTQ's symmetric RTN): ``scale = max(-lo,
  hi) / ((qmax - qmin) / 2)``, no zero point; the group's largest positive weight sits half a step
  past ``qmax`` and is clipped by that half step, so no non-zero group is left unchanged;
- ``symmetric_no_clipping`` (``SYMMETRIC_NO_CLIPPING_ERR``): ``scale = max(lo / qmin, hi / qmax)``;
- ``asymmetric`` (``ASYMMETRIC``): ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = clamp(qmin -
  round(lo / scale), qmin, qmax)``.

then ``q = clamp(round(w * (1 / scale)) + zero_point, qmin, qmax)`` (round half to even) and the
weight becomes ``(q - zero_point) * scale``, in the weight's own dtype. Biases are not quantized.

Library (measured on CPU, torch 2.13.0+cpu, float32): torchao 0.18.0 imports (its bundled CUDA
extensions fail to load with a logged warning, harmless on CPU) and ``IntxWeightOnlyConfig`` runs
int1..int8, per group or per row, symmetric or asymmetric, in pure PyTorch; its ``Int4WeightOnlyConfig``
does not run on CPU (plain: "Requires mslk >= 1.0.0", plain_int32: "does not support device 'cpu'",
tile_packed_to_4d: bfloat16 and CUDA only). optimum-quanto 0.2.7 runs qint8 and qint4 on CPU but
compiles a C++ extension with ninja on first int4 use (37 s here, needs a compiler) and picks the
group size itself (128, else 96/64/32, else per row). bitsandbytes 0.50.2 runs on CPU but offers no
integer 4-bit grid (only NF4/FP4) and its 8-bit weights are row-wise absmax or a non-linear blockwise map.

Linear layers are ``nn.Linear`` (subclasses included) and transformers' ``Conv1D`` (GPT-2, weight
stored transposed; grouped along its input features as well). Embeddings are not linear layers and
are kept. A weight shared with a module that is not quantized (an output layer tied to the input
embeddings) is untied in the copy: the linear layer gets the quantized weight, the embedding keeps
its own, and the copy's config no longer asks Hugging Face to tie them again (``tie_word_embeddings``
and ``all_tied_weights_keys``), so a save and reload keeps the quantized output layer.

The settings offered and their check live in :mod:`simu_core.attacks.quantize_settings` (pure Python):
:mod:`simu_core.config` reads them there, so that the config's code, which every stage's cache key
covers, does not reach this module.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from simu_core.attacks.quantize_settings import (  # noqa: F401  (offered here too)
    QUANTIZATION_BITS, QUANTIZATION_SCHEMES, check_quantization)

if TYPE_CHECKING:
    import torch

# torchao's MappingType member for each scheme.
_MAPPING_TYPES = {
    "symmetric": "SYMMETRIC", "asymmetric": "ASYMMETRIC", "symmetric_no_clipping": "SYMMETRIC_NO_CLIPPING_ERR"}


def _linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """``(name, module, transposed)`` of every linear layer: ``nn.Linear`` (weight ``[out, in]``) and
    transformers' ``Conv1D`` (weight ``[in, out]``, ``transposed``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers.append((name, module, False))
        elif isinstance(module, Conv1D):
            layers.append((name, module, True))
    return layers


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the layers :func:`quantize_weights` quantizes (``nn.Linear`` and ``Conv1D``), in module order."""
    return [name for name, _, _ in _linear_layers(model)]


def check_group_size(model: torch.nn.Module, group_size: int | None) -> None:
    """Refuse a group size that does not divide some linear layer's input features (torchao
    quantizes whole groups only), naming the field and the layers; cheap, run before any work."""
    if group_size is None:
        return
    refused = {}
    for name, module, transposed in _linear_layers(model):
        in_features = module.weight.shape[0 if transposed else 1]
        if in_features % group_size:
            refused[name] = in_features
    if refused:
        shown = ", ".join(f"{name} ({features})" for name, features in list(refused.items())[:4])
        raise ValueError(
            f"attack.quantize.group_size={group_size} does not divide the input features of {len(refused)} linear "
            f"layer(s): {shown}; offered: a divisor of every layer's input features, or None (one group per row)"
        )


def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, scheme: str) -> torch.Tensor:
    """torchao's quantize-dequantize of a ``[out, in]`` weight, grouped along ``in``, in its dtype."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType

    # What quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int<bits>, granularity=PerGroup(g) or
    # PerAxis(0), mapping_type=...)) stores as the module's weight (the test checks it bit for bit).
    block_size = (1, weight.shape[1] if group_size is None else group_size)
    quantized = IntxUnpackedToInt8Tensor.from_hp(
        weight, block_size, getattr(torch, f"int{bits}"), mapping_type=MappingType[_MAPPING_TYPES[scheme]])
    return quantized.dequantize()


def _untie_in_config(model: torch.nn.Module, untied: set[str]) -> None:
    """Stop Hugging Face from tying the ``untied`` parameters again (``tie_weights()``, save and reload)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_keys, dict):
        for target in [key for key, source in tied_keys.items() if key in untied or source in untied]:
            tied_keys.pop(target)


def quantize_weights(model: torch.nn.Module, bits: int, group_size: int | None, scheme: str) -> torch.nn.Module:
    """A deep copy of ``model`` whose every linear layer's weight (``lm_head`` included) is its
    ``bits``-bit quantize-dequantize value (torchao, round to nearest, see the module docstring).

    The modules stay what they were (plain ``nn.Linear``, plain tensors), so forward passes,
    ``generate`` and hooks run unchanged; ``model`` is not modified. A weight tied to an embedding is
    untied in the copy (the embedding keeps its values). Raises ValueError for a setting not offered
    (:func:`check_quantization`, :func:`check_group_size`) or a model without linear layers."""
    import torch

    check_quantization(bits, group_size, scheme)
    check_group_size(model, group_size)
    if not _linear_layers(model):
        raise ValueError(f"quantization attack: {type(model).__name__} has no nn.Linear (or Conv1D) layer to quantize")
    quantized = copy.deepcopy(model)
    layers = _linear_layers(quantized)
    layer_ids = {id(module) for _, module, _ in layers}
    # Parameters of the modules not quantized (embeddings): a linear weight among them is tied to one.
    kept = {
        id(parameter): f"{name}.{parameter_name}" if name else parameter_name
        for name, module in quantized.named_modules()
        if id(module) not in layer_ids
        for parameter_name, parameter in module.named_parameters(recurse=False)
    }
    # One new parameter per shared weight, so linear layers that shared a weight still share it.
    done: dict[int, torch.nn.Parameter] = {}
    untied: set[str] = set()
    with torch.no_grad():
        for name, module, transposed in layers:
            weight = module.weight
            if id(weight) not in done:
                values = weight.detach().t() if transposed else weight.detach()
                values = _fake_quantize(values, bits, group_size, scheme)
                values = values.t().contiguous() if transposed else values
                done[id(weight)] = torch.nn.Parameter(values, requires_grad=weight.requires_grad)
            if id(weight) in kept:
                untied.update({f"{name}.weight" if name else "weight", kept[id(weight)]})
            # A new parameter, never an in-place write: whatever else held the old one keeps its values.
            module.weight = done[id(weight)]
    if untied:
        _untie_in_config(quantized, untied)
    return quantized


def run(model: "torch.nn.Module", tokenizer, benchmark, config) -> "AttackOutcome":
    """The benchmark's attack measures (:func:`~simu_core.benchmarks.attack_measures.attack_measure`: forget and
    retain measures on TOFU-style benchmarks, VerbMem / KnowMem on MUSE, accuracy on WMDP) of ``model``
    and of its quantized copy at each of ``attack.quantize.bits`` (setting ``bits=<b>``)."""
    import time

    from simu_core.attacks.measures import outcome, phase_items, table_rows
    from simu_core.benchmarks.attack_measures import attack_measure

    settings = config.attack.quantize
    check_group_size(model, settings.group_size)
    started = time.perf_counter()
    measure = attack_measure(benchmark, config, tokenizer)
    plain, before = measure(model)
    rows, items = [], [phase_items(plain, "unquantized", "before")]
    for bits in settings.bits:
        quantized = quantize_weights(model, bits, settings.group_size, settings.scheme)
        attacked, after = measure(quantized)
        del quantized
        rows += table_rows("quantize", f"bits={bits}", before, after)
        items.append(phase_items(attacked, f"bits={bits}", "after"))
    per_split = {str(split): int(count) for split, count in plain["split"].value_counts(sort=False).items()}
    return outcome("quantize", rows, items, bits=list(settings.bits), group_size=settings.group_size,
                   scheme=settings.scheme, items_per_split=per_split, seconds=time.perf_counter() - started)
