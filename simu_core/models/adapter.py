"""Architecture adapter: per layer, the MLP down projection (with its orientation) and the
attention projections, for Llama, OLMo (1, 2), Mistral, Qwen2, GPT-2, GPT-NeoX and OPT.

A neuron of layer l is an INPUT coordinate of that layer's down projection; its weights are one
column of the ``[d_model, d_ff]`` weight of an ``nn.Linear``, or one ROW of GPT-2's ``Conv1D``
weight, which is stored transposed (``[d_ff, d_model]``). ``neuron_dim`` records which.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

# Where the decoder layers live, by attribute path from the top-level model.
_LAYER_CONTAINERS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
# Candidate down projections and attention projections, relative to one decoder layer.
_DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2")
_ATTENTION_PROJECTIONS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    ("attn.c_attn", "attn.c_proj"),
    ("attention.query_key_value", "attention.dense"),
)


class UnsupportedArchitectureError(ValueError):
    """The model's layout is not one the adapter knows; the message lists what it found."""


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class DownProjection:
    """The MLP down projection of one layer."""

    layer: int
    name: str  # full parameter-path prefix, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module
    neuron_dim: int  # dim of ``module.weight`` that indexes neurons (1 for Linear, 0 for Conv1D)
    num_neurons: int

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's down projection and attention projection modules."""

    index: int
    down: DownProjection
    attention: tuple[tuple[str, nn.Module], ...]


class ArchitectureAdapter:
    """Finds the modules SIMU needs in any supported Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        container_path, layers = self._find_layers(model)
        self._layer_modules = list(layers)
        self.layers: list[DecoderLayer] = [
            self._describe_layer(index, f"{container_path}.{index}", layer) for index, layer in enumerate(layers)
        ]

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in _LAYER_CONTAINERS:
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return path, layers
        found = sorted(name for name, _ in model.named_modules() if name and name.count(".") <= 1)
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(model).__name__}: no decoder layer list at any of "
            f"{list(_LAYER_CONTAINERS)}; top-level modules found: {found}"
        )

    @staticmethod
    def _describe_layer(index: int, prefix: str, layer: nn.Module) -> DecoderLayer:
        down = None
        for path in _DOWN_PROJECTIONS:
            module = _get(layer, path)
            if module is not None and hasattr(module, "weight"):
                # transformers' Conv1D (GPT-2) stores its weight as [in_features, out_features].
                neuron_dim = 0 if type(module).__name__ == "Conv1D" else 1
                down = DownProjection(index, f"{prefix}.{path}", module, neuron_dim, module.weight.shape[neuron_dim])
                break
        attention = None
        for paths in _ATTENTION_PROJECTIONS:
            modules = [_get(layer, path) for path in paths]
            if all(module is not None for module in modules):
                attention = tuple((f"{prefix}.{path}", module) for path, module in zip(paths, modules))
                break
        if down is None or attention is None:
            found = sorted(name for name, module in layer.named_modules() if name and hasattr(module, "weight"))
            missing = "an MLP down projection" if down is None else "attention projections"
            raise UnsupportedArchitectureError(
                f"unsupported architecture: layer {index} ({type(layer).__name__}) has no {missing} the adapter "
                f"knows (down projections: {list(_DOWN_PROJECTIONS)}); modules with weights found: {found}"
            )
        return DecoderLayer(index, down, attention)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_module(self, index: int) -> nn.Module:
        """Decoder layer ``index`` itself (its output is the hidden state RMU reads)."""
        if not 0 <= index < len(self._layer_modules):
            raise ValueError(f"layer {index} does not exist: the model has {len(self._layer_modules)} decoder layers "
                             f"(0..{len(self._layer_modules) - 1})")
        return self._layer_modules[index]

    @contextlib.contextmanager
    def layer_output(self, index: int | None) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward pass appends decoder layer ``index``'s output (its hidden
        state) to the list it yields; ``None`` captures nothing."""
        captured: list[torch.Tensor] = []
        if index is None:
            yield captured
            return

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self.layer_module(index).register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()

    def down_projections(self) -> list[DownProjection]:
        """The down projection of every layer, in layer order."""
        return [layer.down for layer in self.layers]

    def attention_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every attention projection parameter (weights and biases), with its full name."""
        params = []
        for layer in self.layers:
            for prefix, module in layer.attention:
                for name, param in module.named_parameters(recurse=False):
                    params.append((f"{prefix}.{name}", param))
        return params

    def neurons_per_layer(self) -> list[int]:
        """Number of MLP neurons (down-projection inputs) of every layer."""
        return [layer.down.num_neurons for layer in self.layers]
