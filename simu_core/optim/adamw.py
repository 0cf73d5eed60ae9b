"""AdamW with the project's precision contract: fp32 state and fp32 master weights, any model dtype.

``torch.optim.AdamW`` updates a parameter in its own dtype. On bf16 weights that loses most updates:
an lr of 5e-6 moves a weight of magnitude 0.02 by far less than half its bf16 spacing (6e-5), so
the step rounds back to the old value (measured: 100 steps changed 7.8 % of the weights, against
100 % in fp32). :class:`MasterAdamW` keeps, for every trainable bf16/fp16 parameter, an fp32 master
copy (allocated on its first step: frozen parameters, which get no gradient, never get one), runs
torch's own AdamW arithmetic on the masters with fp32 moments, and copies the result back into the
parameter. The model keeps its dtype; fp32 parameters are updated in place exactly as
``torch.optim.AdamW`` would (same kernel, same arguments: bit-identical results).

Column masks (SIMU's scope with AdamW): a parameter given a :class:`~simu_core.optim.ColumnMask`
keeps state, and an fp32 master, for its trainable columns only; each step gathers those columns of
the gradient, runs the same AdamW arithmetic on the compact master and writes the columns back, so
every other entry stays bit-identical (no weight decay either) and the state is as small as
:class:`~simu_core.optim.MaskedSophia`'s.

Memory: the multi-tensor kernel's temporaries (and the fp32 copies of bf16 gradients) are made for
at most ``foreach_chunk_numel`` coordinates at a time; the update is per coordinate, so chunking does
not change it. Sharded parameters (FSDP2's DTensors) are updated through their local shards.

:class:`simu_core.optim.MaskedSophia` follows the same contract, so first- and second-order methods
are compared on equal terms whatever ``model.dtype`` is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim.adam import adam

from simu_core.optim.sharded import local_tensor
from simu_core.optim.sophia import ColumnMask

__all__ = ["MasterAdamW"]

#: Coordinates whose step temporaries exist at once.
FOREACH_CHUNK_NUMEL = 2**25

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fp32 moments and fp32 masters for bf16/fp16 parameters.

    Args:
        params: parameters or param groups (as for ``torch.optim.AdamW``).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay (``torch.optim.AdamW``'s default 0.01).
        foreach: use the multi-tensor kernel (None: torch's default choice).
        foreach_chunk_numel: at most this many coordinates' temporaries exist at once in a step.
        masks: ``{parameter: ColumnMask}`` (by identity): only those columns are trained (not for
            sharded parameters).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        foreach_chunk_numel: int = FOREACH_CHUNK_NUMEL,
        masks: Mapping[Tensor, ColumnMask] | None = None,
    ) -> None:
        _validate(lr, betas, eps, weight_decay)
        self._columns: dict[int, tuple[int, Tensor]] = {}
        for p, mask in (masks or {}).items():
            if not isinstance(mask, ColumnMask):
                raise ValueError(f"MasterAdamW takes ColumnMask masks only, got {type(mask).__name__}")
            if local_tensor(p) is not p:
                raise ValueError("MasterAdamW does not train column masks of sharded parameters (run.devices > 1); "
                                 "use the Sophia optimizer for SIMU's scope on several devices")
            dim = mask.dim % p.dim()
            indices = torch.as_tensor(mask.indices, dtype=torch.long, device=p.device).unique(sorted=True)
            if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < p.shape[dim]:
                raise ValueError(f"ColumnMask indices out of range for a parameter of shape {tuple(p.shape)}")
            self._columns[id(p)] = (dim, indices)
        if foreach_chunk_numel < 1:
            raise ValueError(f"foreach_chunk_numel must be >= 1, got {foreach_chunk_numel}")
        self.foreach_chunk_numel = foreach_chunk_numel
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyper-parameters and the dtype of its parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for p in group["params"]:
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"MasterAdamW supports float32, bfloat16 and float16 params, got {p.dtype}")

    def _state(self, p: Tensor) -> dict[str, Any]:
        """Lazily allocated fp32 state (as torch's AdamW lays it out), plus a master for non-fp32 params."""
        state = self.state[p]
        if not state:
            local = local_tensor(p)
            columns = self._columns.get(id(p))
            if columns is not None:  # state and master for the trainable columns only
                local = local.detach().index_select(columns[0], columns[1])
            # A CPU fp32 step counter, as torch.optim.AdamW keeps it (non-capturable, non-fused).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            state["exp_avg_sq"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            if p.dtype != torch.float32 or columns is not None:
                state["master"] = local.detach().to(torch.float32, copy=True)
        return state

    def trainable_part(self, p: Tensor, values: Tensor) -> Tensor | None:
        """The entries of ``values`` (shaped as ``p``) at ``p``'s trainable coordinates."""
        columns = self._columns.get(id(p))
        return values if columns is None else values.index_select(columns[0], columns[1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step on every parameter with a gradient; low-precision ones via their masters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for chunk in self._chunks(group):
                params, grads, exp_avgs, exp_avg_sqs, steps, writeback = [], [], [], [], [], []
                for p in chunk:
                    state = self._state(p)
                    master = state.get("master")
                    local, grad = local_tensor(p), local_tensor(p.grad)
                    columns = self._columns.get(id(p))
                    if columns is not None:
                        grad = grad.index_select(columns[0], columns[1])
                    params.append(local if master is None else master)
                    grads.append(grad if master is None else grad.float())
                    exp_avgs.append(state["exp_avg"])
                    exp_avg_sqs.append(state["exp_avg_sq"])
                    steps.append(state["step"])
                    if master is not None:
                        writeback.append((local, master, columns))
                adam(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps,
                    foreach=group["foreach"], decoupled_weight_decay=True, amsgrad=False,
                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=False,
                )
                del grads
                for local, master, columns in writeback:
                    if columns is None:
                        local.copy_(master)  # rounds the fp32 result once; the master keeps what rounding drops
                    else:
                        local.index_copy_(columns[0], columns[1], master.to(local.dtype))
        return loss

    def _chunks(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """The group's parameters with a gradient, in order, in runs of at most ``foreach_chunk_numel``
        coordinates (a larger tensor is a run of its own)."""
        chunks: list[list[Tensor]] = []
        size = 0
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("MasterAdamW does not support sparse gradients")
            columns = self._columns.get(id(p))
            numel = local_tensor(p).numel() if columns is None else \
                local_tensor(p).numel() // p.shape[columns[0]] * columns[1].numel()
            if not chunks or size + numel > self.foreach_chunk_numel:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += numel
        return chunks

    def state_bytes(self) -> int:
        """Total bytes of the optimizer's state tensors (moments and fp32 masters)."""
        return sum(t.nbytes for s in self.state.values() for t in s.values() if isinstance(t, Tensor))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping moments and masters fp32.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype,
        which would turn the fp32 state of a bf16 parameter into bf16; we redo that part.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None or p.dtype == torch.float32:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in saved:
                    state[key] = saved[key].to(device=local_tensor(p).device, dtype=torch.float32, copy=True)


def _validate(lr: float, betas: Iterable[float], eps: float, weight_decay: float) -> None:
    betas = tuple(betas)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
