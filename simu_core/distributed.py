"""One model over several devices: the fine-tuning and unlearning stages under PyTorch FSDP2,
launched with torchrun.

How a run is spread (``run.devices > 1``):

- **Launch.** :func:`simu_core.stages.unlearn` and :func:`simu_core.stages.train_model` (the
  ``train_target`` / ``train_retain_reference`` stages) start ``torchrun --standalone
  --nproc-per-node N -m simu_core.distributed_worker --stage unlearn|train ...`` on this machine
  (:func:`launch_stage`, which first refuses more devices than the machine has:
  :func:`check_devices`) and wait for it; every process runs the same stage function, which sees
  the process group and takes the sharded path. Several machines: start ``torchrun --nnodes M
  --nproc-per-node N ... -m simu_core.distributed_worker`` on each of them yourself (the README's
  "Large models"); the world is whatever torchrun made. GPUs use NCCL, CPU processes gloo (tests,
  and machines without GPUs).
- **Sharding** (:func:`shard_model`). FSDP2's ``fully_shard`` on every decoder layer, then on the
  model (and the same for unlearning's frozen reference model), after unlearning's frozen set is
  fixed: each parameter becomes a DTensor sharded along dim 0, gradients are reduce-scattered in
  fp32 and summed (each process's loss is already its share of the global one). Masked Sophia
  and MasterAdamW update the local shards (``simu_core.optim.sharded``): frozen entries are never
  written, state exists only for a shard's trainable entries.
- **Data.** Every process reads the whole data and plans the same batches; each micro-batch's
  items are split in contiguous chunks over the processes (:meth:`DistributedContext.split`). A
  process's loss term is its chunk's mean times (its chunk's answer tokens, or sequences for the
  sequence-level NPO/SimNPO) / (the micro-batch's), so the sum over processes is the one-process
  loss, and so are the gradients, the clipping norm (:meth:`DistributedContext.clip_grad_norm_`:
  squares summed over processes) and the optimizers' per-coordinate updates: the fine-tuned and
  unlearned weights equal a one-process run's within float rounding (``tests/test_distributed.py``).
  A process whose chunk is empty (a micro-batch smaller than the world) runs the first item with
  weight 0, since FSDP's collectives need every process. Logged figures are summed over processes.
- **Output.** The full weights are gathered to process 0 on CPU (:func:`full_state_dict`) and
  saved there with the log and ``stats.json``; the launcher reads the stats back.

Not supported with several processes: periodic checkpoints (``unlearn.checkpoint_every``, refused
by the config), and Sophia-G's sampled labels are drawn per process (the same distribution as one
process, other draws). Loading: each process reads (or, for the tiny model, builds) the whole model
on CPU before sharding, so a machine needs N x the model's size in host memory while loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from simu_core.config import SimuConfig

__all__ = [
    "DistributedContext",
    "DistributedRunError",
    "available_devices",
    "check_devices",
    "current_context",
    "full_state_dict",
    "launch_stage",
    "reset_context",
    "shard_model",
]


class DistributedRunError(RuntimeError):
    """The launched processes failed; the message holds the first failing process's error."""


def available_devices(device: str) -> tuple[int, str]:
    """How many processes ``run.device`` can get on this machine, and what they are."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count(), "CUDA device(s)"
    return os.cpu_count() or 1, "CPU core(s) (one gloo process each)"


def check_devices(config: SimuConfig) -> None:
    """Raise ValueError naming both numbers when ``run.devices`` exceeds what this machine has."""
    wanted = config.run.devices
    if wanted <= 1:
        return
    have, what = available_devices(config.run.device)
    if wanted > have:
        raise ValueError(
            f"run.devices={wanted} but this machine has {have} {what} for run.device={config.run.device!r}; "
            f"use run.devices<={have}, or start torchrun on several machines (README, 'Large models')"
        )


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the group: rank, world size, device and the 1-D device mesh."""

    rank: int
    world: int
    device: torch.device
    mesh: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: Sequence[int]) -> list[int]:
        """This process's contiguous chunk of a micro-batch's items (earlier ranks take the remainder)."""
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over processes (a new tensor on this process's device)."""
        values = values.to(self.device, copy=True)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def clip_grad_norm_(
        self, grads: Sequence[torch.Tensor], max_norm: float, norm_of: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Clip local gradient shards in place to the global 2-norm ``max_norm``; returns that norm (CPU).

        The norm is measured over ``norm_of`` (default ``grads``; e.g. only a shard's trainable
        entries): squares summed in float64 here, then over processes; the coefficient is torch's
        ``clip_grad_norm_``'s, ``min(1, max_norm / (norm + 1e-6))``. Every process must call it.
        """
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for tensor in grads if norm_of is None else norm_of:
            square += tensor.double().pow(2).sum()
        norm = self.all_reduce_sum(square).sqrt().float()
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))
        return norm.cpu()


def current_context() -> DistributedContext | None:
    """The context of a process started by torchrun (process group initialised), else None."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    global _CONTEXT
    if _CONTEXT is None:
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            device = torch.device("cpu")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        _CONTEXT = DistributedContext(dist.get_rank(), dist.get_world_size(), device, mesh)
    return _CONTEXT


_CONTEXT: DistributedContext | None = None


def reset_context() -> None:
    """Forget the cached context (the process group is being destroyed)."""
    global _CONTEXT
    _CONTEXT = None


def shard_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """FSDP2 over ``context``'s mesh: each decoder layer, then the whole model (in place).

    Gradients are reduce-scattered in fp32 and summed, not averaged: each process's loss is its
    share of the global loss. Parameters keep their dtype (no mixed-precision casting).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from simu_core.models.adapter import ArchitectureAdapter

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    layers = ArchitectureAdapter._find_layers(model)[1]
    for layer in layers:
        fully_shard(layer, mesh=context.mesh, mp_policy=policy)
    fully_shard(model, mesh=context.mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (gloo has no pre-multiplied sum; with a factor of 1 there is nothing to scale).
            module.set_force_sum_reduction_for_comms(True)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU in process 0 (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------
# launcher (the stage's side) and worker (each process)


#: The stages a launch runs, and how its errors name them.
STAGES = {"unlearn": "unlearning", "train": "fine-tuning"}


def launch_stage(
    config: SimuConfig,
    stage: str,
    data_dir: Path,
    out_dir: Path,
    *,
    which: str | None = None,
    target_dir: Path | None = None,
    mask_dir: Path | None = None,
    reference_dir: Path | None = None,
    reference_items: Path | None = None,
    alternates_dir: Path | None = None,
) -> dict[str, Any]:
    """Run a stage over ``run.devices`` processes on this machine; returns its stats.

    ``stage``: ``"unlearn"`` (:func:`simu_core.stages.unlearn`: ``target_dir``, optional
    ``mask_dir``, ``reference_dir`` and ``reference_items``: the retain reference's items table for
    ``unlearn.stop_at``; ``alternates_dir``: AltPO's alternates) or ``"train"`` (:func:`simu_core.stages.train_model`:
    ``which`` is ``"target"`` or ``"reference"``). Runs ``torchrun --standalone --nproc-per-node
    run.devices -m simu_core.distributed_worker --stage STAGE ...``; the output of the processes goes
    to this process's stdout/stderr (process 0 shows the progress bar). CPU processes get ``torch
    threads / run.devices`` threads each. More devices than this machine has are refused first.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    if stage == "train" and which not in ("target", "reference"):
        raise ValueError(f"which must be 'target' or 'reference', got {which!r}")
    if stage == "unlearn" and target_dir is None:
        raise ValueError("the unlearning stage needs target_dir")
    check_devices(config)
    what = STAGES[stage] + (f" ({which})" if stage == "train" else "")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="simu-fsdp-") as scratch:
        config_path = Path(scratch) / "config.json"
        config_path.write_text(json.dumps(config.model_dump(mode="json")))
        error_path = Path(scratch) / "error.txt"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.run.devices}",
            "-m", "simu_core.distributed_worker", "--stage", stage, "--config", str(config_path),
            "--data", str(data_dir), "--out", str(out_dir), "--error-file", str(error_path),
        ]
        options = {"--which": which, "--target": target_dir, "--mask": mask_dir, "--reference": reference_dir,
                   "--reference-items": reference_items, "--alternates": alternates_dir}
        for flag, value in options.items():
            if value is not None:
                command += [flag, str(value)]
        env = dict(os.environ)
        if config.run.device == "cpu" or not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // config.run.devices))
        completed = subprocess.run(command, env=env, check=False)
        if completed.returncode != 0:
            detail = error_path.read_text().strip() if error_path.is_file() else "see the processes' output above"
            raise DistributedRunError(
                f"{what} over {config.run.devices} processes failed (torchrun exit status "
                f"{completed.returncode}): {detail}"
            )
    stats = out_dir / "stats.json"
    if not stats.is_file():
        raise DistributedRunError(f"{what} over {config.run.devices} processes wrote no {stats}")
    return json.loads(stats.read_text())
