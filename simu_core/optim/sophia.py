"""Masked Sophia: second-order unlearning that updates only a chosen subset of coordinates.

The update is SophiaG's (Liu et al. 2023; the project's reference notes ``sophia.md``), per coordinate::

    step += 1
    theta <- theta * (1 - lr * weight_decay)          # decoupled weight decay
    m     <- beta1 * m + (1 - beta1) * g
    ratio <- min(|m| / (rho * bs * h + 1e-15), 1)
    theta <- theta - lr * sign(m) * ratio

with ``h <- beta2 * h + (1 - beta2) * g * g`` done separately by :meth:`MaskedSophia.update_hessian`
(every k steps with sampled-label gradients for the ``gnb`` variant, every step with the loss
gradient for ``soul``). Unmasked, the arithmetic is SophiaG's, operation for operation.

SIMU's masked update (exact freezing): the new m, h and theta are taken only where the mask is 1;
everywhere else the previous values stay bit-identical, weight decay included. A mask is given per
parameter as ``None`` (all trainable), a bool tensor of the parameter's shape, or a
:class:`ColumnMask` (only some slices along one dim, e.g. the critical-neuron columns of an MLP down
projection). A :class:`ColumnMask` keeps m and h only for its slices, so the state of a down
projection with 5% critical neurons is 5% of its size. Frozen tensors get no state at all.

Precision: state is always fp32. For bf16/fp16 parameters the optimizer keeps an fp32 master copy of
the trainable coordinates in its state (``state["master"]``), updates that and writes the rounded
value back into the parameter; a Sophia step is often clipped to +-lr and 1e-5 steps vanish in bf16.
The master copy is taken from the parameter at the first step and is the source of truth after
that, so do not edit low-precision parameters behind the optimizer's back.

Memory: the step's temporaries (fp32 gradients of bf16 parameters, the ratio's denominator, the
ratio, the sign) are made for at most ``foreach_chunk_numel`` coordinates at a time (the arithmetic
is per coordinate, so the result does not depend on the chunking): without it they would take 12
(fp32) to 16 (bf16) bytes per trainable coordinate at once (75 GiB for SO-GradDiff on a 7B fp32 model).

Sharded parameters (FSDP2's DTensors, ``simu_core.distributed``): each process updates its local
shard. A mask is given for the whole parameter and cut to the shard here (a :class:`ColumnMask` on
the sharded dim keeps the indices that fall in the shard), so freezing stays exact and the state
stays compact per process; the win rate is summed over the processes. Because the update is per
coordinate, the sharded run computes what one process computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor

from simu_core.optim.sharded import all_reduce_sum, is_dtensor, local_tensor, shard_range

__all__ = ["ColumnMask", "MaskSpec", "MaskedSophia", "sample_gnb_labels"]

_EPS = 1e-15  # SophiaG's constant in the ratio's denominator
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Coordinates whose step temporaries exist at once (4 fp32 temporaries: 512 MiB).
FOREACH_CHUNK_NUMEL = 2**25


@dataclass(frozen=True, eq=False)
class ColumnMask:
    """Only the slices ``indices`` along ``dim`` are trainable (compact state for those slices).

    For an ``nn.Linear`` down projection (weight ``[d_model, d_ff]``) neuron columns are ``dim=1``;
    for GPT-2's ``Conv1D`` (stored ``[d_ff, d_model]``) they are ``dim=0``. Compact state slice i
    belongs to ``indices[i]`` (the order given).
    """

    dim: int
    indices: Tensor


MaskSpec = None | Tensor | ColumnMask


@dataclass(frozen=True, eq=False)
class _Mask:
    """A validated mask: how to find the trainable coordinates of one parameter."""

    kind: Literal["full", "dense", "columns", "frozen"]
    numel: int  # number of trainable coordinates (the win rate's denominator)
    dense: Tensor | None = None  # bool, parameter's shape (kind "dense")
    dim: int = 0  # kind "columns"
    indices: Tensor | None = None  # kind "columns", long, on the parameter's device

    def gather(self, t: Tensor) -> Tensor:
        """The trainable slice of a parameter-shaped tensor (a copy for columns, else ``t``)."""
        return t.index_select(self.dim, self.indices) if self.kind == "columns" else t

    def state_shape(self, p: Tensor) -> torch.Size:
        if self.kind != "columns":
            return p.shape
        shape = list(p.shape)
        shape[self.dim] = self.indices.numel()
        return torch.Size(shape)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate_mask(p: Tensor, spec: Any) -> _Mask:
    """Turn a user mask spec into a :class:`_Mask`, raising ValueError on anything inconsistent."""
    if spec is None:
        return _Mask("full", p.numel())
    if isinstance(spec, ColumnMask):
        if not isinstance(spec.dim, int) or not -p.dim() <= spec.dim < p.dim():
            raise ValueError(f"ColumnMask dim {spec.dim!r} is out of range for parameter shape {_shape(p)}")
        dim = spec.dim % p.dim()
        idx = torch.as_tensor(spec.indices)
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
            raise ValueError(
                f"ColumnMask indices must be a 1-D integer tensor, got dtype {idx.dtype} shape {_shape(idx)}"
            )
        if idx.numel() == 0:
            return _Mask("frozen", 0)
        size = p.shape[dim]
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise ValueError(
                f"ColumnMask indices must lie in [0, {size}) for dim {dim} of parameter shape {_shape(p)}, "
                f"got min {lo} and max {hi}"
            )
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("ColumnMask indices contain duplicates")
        idx = idx.to(device=p.device, dtype=torch.long)
        return _Mask("columns", idx.numel() * (p.numel() // size), dim=dim, indices=idx)
    if isinstance(spec, Tensor):
        if _shape(spec) != _shape(p):
            raise ValueError(f"mask shape {_shape(spec)} does not match parameter shape {_shape(p)}")
        if spec.dtype != torch.bool:
            if not bool(((spec == 0) | (spec == 1)).all()):
                raise ValueError(f"mask of dtype {spec.dtype} must hold only 0 and 1 (or be a bool tensor)")
            spec = spec != 0
        numel = int(spec.sum())
        if numel == 0:
            return _Mask("frozen", 0)
        return _Mask("dense", numel, dense=spec.to(p.device))
    raise ValueError(f"mask must be None, a bool tensor or a ColumnMask, got {type(spec).__name__}")


def _localize(mask: _Mask, p: Tensor) -> _Mask:
    """The part of a whole-parameter mask that falls in this process's shard of ``p`` (a DTensor)."""
    where = shard_range(p)
    local = p.to_local()
    if where is None or mask.kind == "frozen":
        return mask if mask.kind != "full" else _Mask("full", local.numel())
    dim, offset, length = where
    if mask.kind == "full":
        return _Mask("full", local.numel())
    if mask.kind == "dense":
        dense = mask.dense.narrow(dim, offset, length)
        numel = int(dense.sum())
        return _Mask("dense", numel, dense=dense.to(local.device)) if numel else _Mask("frozen", 0)
    if mask.dim != dim:  # the columns are cut along another dim: every shard holds all of them
        per_slice = local.numel() // max(1, local.shape[mask.dim])
        return _Mask("columns", mask.indices.numel() * per_slice, dim=mask.dim, indices=mask.indices.to(local.device))
    inside = (mask.indices >= offset) & (mask.indices < offset + length)
    indices = mask.indices[inside] - offset  # in the given order: compact state slice i is indices[i]
    if indices.numel() == 0:
        return _Mask("frozen", 0)
    per_slice = local.numel() // max(1, length)
    return _Mask("columns", indices.numel() * per_slice, dim=dim, indices=indices.to(local.device))


class MaskedSophia(torch.optim.Optimizer):
    """SophiaG with SIMU's exact-freezing masks, fp32 state and an fp32 master for bf16/fp16 params.

    Args:
        params: parameters or param groups. A group may carry ``"masks"``, a list aligned with its
            ``"params"``.
        lr: learning rate (the largest per-coordinate step, since the ratio is clipped at 1).
        betas: EMA coefficients of the momentum and of the Hessian estimate.
        rho: clipping scale; the step is ``lr * sign(m) * min(|m| / (rho * bs * h), 1)``.
        weight_decay: decoupled weight decay, applied to trainable coordinates only.
        hessian_batch_size: default ``bs`` of :meth:`step` (SophiaG's ``step(bs=5120)``): the number
            of loss terms averaged in the loss that produced h (tokens per batch), so that
            ``rho * bs * h`` is the paper's gamma * h_GNB. SOUL keeps it fixed at 5120.
        masks: ``{parameter: spec}`` (by identity), spec ``None`` | bool tensor | :class:`ColumnMask`.
        track_win_rate: compute :attr:`last_win_rate` each step (two extra foreach passes).
        foreach_chunk_numel: at most this many coordinates' temporaries exist at once in a step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        hessian_batch_size: int = 5120,
        masks: Mapping[Tensor, MaskSpec] | None = None,
        *,
        track_win_rate: bool = True,
        foreach_chunk_numel: int = FOREACH_CHUNK_NUMEL,
    ) -> None:
        _validate_hparams(lr, betas, rho, weight_decay, hessian_batch_size)
        if foreach_chunk_numel < 1:
            raise ValueError(f"foreach_chunk_numel must be >= 1, got {foreach_chunk_numel}")
        self.foreach_chunk_numel = foreach_chunk_numel
        self._process_group: Any = None  # set when parameters are sharded (DTensor)
        self._mesh_device = torch.device("cpu")
        # add_param_group (called by the base constructor) reads these.
        self._mask_arg: dict[int, MaskSpec] = {id(p): spec for p, spec in (masks or {}).items()}
        self._masks: dict[int, _Mask] = {}
        self.track_win_rate = track_win_rate
        self._win_rate: Tensor | None = None
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                        hessian_batch_size=hessian_batch_size)
        super().__init__(params, defaults)
        unknown = set(self._mask_arg) - set(self._masks)
        if unknown:
            raise ValueError(f"masks given for {len(unknown)} tensor(s) that are not among the optimizer's params")

    # ----------------------------------------------------------------------------------- setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its optional ``"masks"`` list is validated and kept out of the group dict."""
        param_group = dict(param_group)  # do not mutate the caller's dict
        group_masks = param_group.pop("masks", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hparams(group["lr"], group["betas"], group["rho"], group["weight_decay"],
                          group["hessian_batch_size"])
        params = group["params"]
        if group_masks is not None and len(group_masks) != len(params):
            raise ValueError(f"param group 'masks' has {len(group_masks)} entries for {len(params)} params")
        for i, p in enumerate(params):
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"MaskedSophia supports float32, bfloat16 and float16 params, got {p.dtype}")
            spec = self._mask_arg.get(id(p))
            if group_masks is not None and group_masks[i] is not None:
                if spec is not None:
                    raise ValueError(f"parameter of shape {_shape(p)} has a mask both in `masks` and in its group")
                spec = group_masks[i]
            mask = _validate_mask(p, spec)
            if is_dtensor(p):
                mask = _localize(mask, p)
                group_of_p = p.device_mesh.get_group()
                if self._process_group is not None and self._process_group is not group_of_p:
                    raise ValueError("MaskedSophia: every sharded parameter must live on the same device mesh")
                self._process_group = group_of_p
                self._mesh_device = torch.device(p.device_mesh.device_type)
            self._masks[id(p)] = mask

    def trainable_part(self, p: Tensor, values: Tensor) -> Tensor | None:
        """The entries of ``values`` (shaped as this process's shard of ``p``) at ``p``'s trainable
        coordinates (zeros elsewhere for a dense mask), or None when none is trainable here."""
        mask = self._masks[id(p)]
        if mask.kind == "frozen":
            return None
        if mask.kind == "dense":
            return torch.where(mask.dense, values, 0.0)
        return mask.gather(values)

    def _trainable(self, p: Tensor) -> _Mask | None:
        """The mask of ``p`` if it takes part in this step, else None (no state is ever touched)."""
        mask = self._masks[id(p)]
        if p.grad is None or not p.requires_grad or mask.kind == "frozen":
            return None
        if p.grad.is_sparse:
            raise ValueError("MaskedSophia does not support sparse gradients")
        return mask

    def _state(self, p: Tensor, mask: _Mask) -> dict[str, Any]:
        """Lazily allocated fp32 state: compact for column masks, plus a master copy for bf16/fp16."""
        state = self.state[p]
        if not state:
            local = local_tensor(p)
            shape = mask.state_shape(local)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=local.device)
            state["hessian"] = torch.zeros(shape, dtype=torch.float32, device=local.device)
            if p.dtype != torch.float32:
                state["master"] = mask.gather(local.detach()).to(torch.float32, copy=True)
        return state

    def _chunks(self, group: dict[str, Any]) -> Iterator[list[tuple[Tensor, _Mask]]]:
        """The group's trainable (parameter, mask) pairs, in order, in runs of at most
        ``foreach_chunk_numel`` coordinates (a larger tensor is a run of its own)."""
        chunk: list[tuple[Tensor, _Mask]] = []
        size = 0
        for p in group["params"]:
            mask = self._trainable(p)
            if mask is None:
                continue
            numel = mask.state_shape(local_tensor(p)).numel()
            if chunk and size + numel > self.foreach_chunk_numel:
                yield chunk
                chunk, size = [], 0
            chunk.append((p, mask))
            size += numel
        if chunk:
            yield chunk

    # ------------------------------------------------------------------------------- updates

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 * h + (1 - beta2) * g * g on trainable coordinates, with g the current ``.grad``."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for chunk in self._chunks(group):
                hs, gs = [], []
                for p, mask in chunk:
                    h = self._state(p, mask)["hessian"]
                    g = mask.gather(local_tensor(p.grad)).float()
                    if mask.kind == "dense":
                        h.copy_(torch.where(mask.dense, h.mul(beta2).addcmul_(g, g, value=1 - beta2), h))
                    else:
                        hs.append(h)
                        gs.append(g)
                if hs:
                    torch._foreach_mul_(hs, beta2)
                    torch._foreach_addcmul_(hs, gs, gs, value=1 - beta2)
                del hs, gs

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, bs: int | None = None) -> Tensor | None:
        """One Sophia step on the trainable coordinates; ``bs`` overrides ``hessian_batch_size``."""
        if bs is not None and not bs > 0:
            raise ValueError(f"bs must be > 0, got {bs}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clipped: list[Tensor] = []  # per tensor: number of trainable coordinates with ratio == 1
        n_trainable = 0
        for group in self.param_groups:
            lr, rho, wd = group["lr"], group["rho"], group["weight_decay"]
            beta1 = group["betas"][0]
            group_bs = group["hessian_batch_size"] if bs is None else bs

            # Per chunk, work lists: the foreach math below runs in place on `thetas` and `ms`. For a
            # plain fp32 parameter those are the parameter and its state; otherwise they are fp32 copies
            # that `writeback` puts back (only the trainable coordinates, so frozen ones are never written).
            for chunk in self._chunks(group):
                thetas, grads, ms, hs, masks, writeback = [], [], [], [], [], []
                for p, mask in chunk:
                    state = self._state(p, mask)
                    state["step"] += 1
                    theta = state["master"] if "master" in state else mask.gather(local_tensor(p))
                    m = state["exp_avg"]
                    if mask.kind == "dense":
                        theta, m = theta.clone(), m.clone()
                    thetas.append(theta)
                    grads.append(mask.gather(local_tensor(p.grad)).float())
                    ms.append(m)
                    hs.append(state["hessian"])
                    masks.append(mask)
                    writeback.append((p, state, mask, theta, m))
                    n_trainable += mask.numel

                # SophiaG's arithmetic, in its order, so unmasked results match it exactly.
                if wd != 0:  # SophiaG multiplies by 1.0 when wd == 0, which is a no-op
                    torch._foreach_mul_(thetas, 1 - lr * wd)
                torch._foreach_mul_(ms, beta1)
                torch._foreach_add_(ms, grads, alpha=1 - beta1)
                del grads
                denom = torch._foreach_mul(hs, rho * group_bs)
                torch._foreach_add_(denom, _EPS)
                ratio = torch._foreach_abs(ms)
                torch._foreach_div_(ratio, denom)
                del denom
                torch._foreach_clamp_max_(ratio, 1.0)
                torch._foreach_addcmul_(thetas, torch._foreach_sign(ms), ratio, value=-lr)

                if self.track_win_rate:
                    # ratio is in [0, 1] after the clamp, so floor() is 1 exactly where it was clipped
                    # (in place: ratio is not needed any more).
                    torch._foreach_floor_(ratio)
                    flags = [torch.where(mk.dense, r, 0.0) if mk.kind == "dense" else r for r, mk in zip(ratio, masks)]
                    clipped.extend(torch._foreach_norm(flags, 1))
                del ratio

                for p, state, mask, theta, m in writeback:
                    self._write_back(p, state, mask, theta, m)

        self._win_rate = None
        if self.track_win_rate and self._process_group is not None:
            # Sharded: the win rate of the whole model (every process calls step, so all take part).
            counts = torch.zeros(2, dtype=torch.float64, device=self._mesh_device)
            counts[0] = n_trainable
            if clipped:
                counts[1] = torch.stack(clipped).double().sum()
            counts = all_reduce_sum(counts, self._process_group)
            self._win_rate = (counts[0] - counts[1]) / counts[0]
        elif self.track_win_rate and n_trainable:
            self._win_rate = (n_trainable - torch.stack(clipped).double().sum()) / n_trainable
        return loss

    @staticmethod
    def _write_back(p: Tensor, state: dict[str, Any], mask: _Mask, theta: Tensor, m: Tensor) -> None:
        """Copy updated trainable coordinates into state and parameter, leaving the rest untouched."""
        p = local_tensor(p)
        master = state.get("master")
        if mask.kind == "dense":
            state["exp_avg"].copy_(torch.where(mask.dense, m, state["exp_avg"]))
            if master is not None:
                master.copy_(torch.where(mask.dense, theta, master))
                theta = master
            p.copy_(torch.where(mask.dense, theta.to(p.dtype), p))
        elif mask.kind == "columns":
            p.index_copy_(mask.dim, mask.indices, theta.to(p.dtype))
        elif master is not None:  # full low-precision parameter
            p.copy_(master)
        # full fp32 parameter: already updated in place

    # ------------------------------------------------------------------------------ reporting

    @property
    def last_win_rate(self) -> float | None:
        """Fraction of trainable coordinates with ratio < 1 (not clipped) in the last step.

        Kept as a device tensor during :meth:`step` and converted here, so only reading it syncs.
        Counts are accumulated in fp32 per tensor (exact below 2**24 coordinates per tensor).
        """
        return None if self._win_rate is None else float(self._win_rate)

    def state_bytes(self) -> int:
        """Total bytes of the optimizer's state tensors (momentum, Hessian, fp32 masters)."""
        return sum(t.nbytes for s in self.state.values() for t in s.values() if isinstance(t, Tensor))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping it fp32 and checking each tensor's shape against this optimizer's masks.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype,
        which would turn fp32 state and masters of bf16 params into bf16; we redo that part.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            local = local_tensor(p)
            state = {k: v.to(device=local.device, dtype=torch.float32, copy=True) if isinstance(v, Tensor) else v
                     for k, v in saved.items()}
            expected = self._masks[id(p)].state_shape(local)
            for key in ("exp_avg", "hessian", "master"):
                if key in state and state[key].shape != expected:
                    raise ValueError(
                        f"loaded state {key!r} has shape {_shape(state[key])} but this optimizer's mask for "
                        f"the parameter of shape {_shape(p)} expects {tuple(expected)}"
                    )
            self.state[p] = state


def _validate_hparams(lr: float, betas: Sequence[float], rho: float, weight_decay: float, bs: int) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {tuple(betas)}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not bs > 0:
        raise ValueError(f"hessian_batch_size must be > 0, got {bs}")


def sample_gnb_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Labels for Sophia-G's Gauss-Newton-Bartlett Hessian estimate: y ~ softmax(logits) per position.

    The ``gnb`` variant: every k steps, forward the batch without labels, sample ``y`` here, take the
    mean cross-entropy of the logits against ``y``, backpropagate, then call
    :meth:`MaskedSophia.update_hessian`. Returns a LongTensor of shape ``logits.shape[:-1]``; pass a
    ``generator`` on the logits' device for reproducible samples.
    """
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
