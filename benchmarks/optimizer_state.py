"""SIMU's trainable set for a Llama-style model, and optimizer-state sizes computed from shapes.

Works on meta-device models (``with torch.device("meta"): model = LlamaForCausalLM(config)``): only
shapes and dtypes are read, nothing is allocated. :func:`sophia_state_bytes` follows
``MaskedSophia``'s allocation rule, so for a real model after one step it equals
``MaskedSophia.state_bytes()`` (``benchmarks/optimizer.py`` checks this).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from simu_core.optim import ColumnMask, MaskSpec

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DOWN_PROJECTION = "down_proj"
NEURON_DIM = 1  # nn.Linear down projection weight is [d_model, d_ff]: neuron k is column k


def n_critical(d_ff: int, fraction: float) -> int:
    """Number of critical neurons for a layer of width ``d_ff`` (at least one)."""
    return max(1, round(fraction * d_ff))


def simu_masks(
    model: nn.Module,
    critical_fraction: float = 0.05,
    generator: torch.Generator | None = None,
    attention: bool = True,
) -> dict[str, MaskSpec]:
    """SIMU's trainable set by parameter name; names not returned are frozen.

    Attention projections (q, k, v, o weights) are fully trainable (``None``); each MLP down
    projection gets a :class:`ColumnMask` of ``critical_fraction`` of its neurons, chosen at random
    here (stand-ins for attribution's critical neurons: only their number matters for cost).
    """
    specs: dict[str, MaskSpec] = {}
    for name, p in model.named_parameters():
        if not name.endswith(".weight"):
            continue
        module_name = name.split(".")[-2]
        if attention and module_name in ATTENTION_PROJECTIONS:
            specs[name] = None
        elif module_name == DOWN_PROJECTION:
            d_ff = p.shape[NEURON_DIM]
            cols = torch.randperm(d_ff, generator=generator)[: n_critical(d_ff, critical_fraction)]
            specs[name] = ColumnMask(NEURON_DIM, cols.sort().values)
    return specs


def trainable_numel(p: torch.Tensor, spec: MaskSpec) -> int:
    """Trainable coordinates of ``p`` under ``spec`` (None: all of them)."""
    if spec is None:
        return p.numel()
    if isinstance(spec, ColumnMask):
        return spec.indices.numel() * (p.numel() // p.shape[spec.dim])
    return int(spec.sum())


def sophia_state_bytes(
    named_params: Iterable[tuple[str, torch.Tensor]], specs: Mapping[str, MaskSpec] | None = None
) -> int:
    """Bytes MaskedSophia allocates: fp32 m and h per trainable coordinate, plus an fp32 master copy
    for bf16/fp16 params. ``specs=None`` means every parameter is fully trainable (SO-GradDiff);
    otherwise only the named ones are trainable (SIMU). Dense-mask state is full-shape."""
    total = 0
    for name, p in named_params:
        if specs is not None and name not in specs:
            continue
        spec = None if specs is None else specs[name]
        if isinstance(spec, torch.Tensor):
            n = p.numel() if bool(spec.any()) else 0  # dense masks keep full-shape state
        else:
            n = trainable_numel(p, spec)
        per_coordinate = 2 if p.dtype == torch.float32 else 3
        total += per_coordinate * 4 * n
    return total


def adamw_state_bytes(named_params: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Bytes ``MasterAdamW`` allocates over all params (FO-GradDiff): fp32 exp_avg and exp_avg_sq,
    an fp32 master for non-fp32 params, and a 4-byte step tensor per param."""
    return sum((2 if p.dtype == torch.float32 else 3) * 4 * p.numel() + 4 for _, p in named_params)


def describe_simu_set(model: nn.Module, specs: Mapping[str, MaskSpec]) -> list[str]:
    """Human-readable summary of the trainable set, one line per kind of tensor."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    attn = [n for n, s in specs.items() if s is None]
    down = [n for n, s in specs.items() if isinstance(s, ColumnMask)]
    n_attn = sum(named[n].numel() for n in attn)
    n_down = sum(trainable_numel(named[n], specs[n]) for n in down)
    frozen = sorted({n.split(".")[-2] for n in named if n not in specs})
    lines = [
        f"attention projections (full): {len(attn)} tensors, {n_attn:,} coordinates",
    ]
    if down:
        p, spec = named[down[0]], specs[down[0]]
        lines.append(
            f"down-projection critical columns (ColumnMask dim={spec.dim}): {len(down)} tensors x "
            f"{spec.indices.numel()} of {p.shape[spec.dim]} columns, {n_down:,} coordinates"
        )
    lines.append(f"frozen (no state): {', '.join(frozen)} and the non-critical down-projection columns")
    lines.append(f"trainable: {n_attn + n_down:,} of {total:,} parameters ({(n_attn + n_down) / total:.2%})")
    return lines
