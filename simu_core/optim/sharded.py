"""Sharded parameters (FSDP2's DTensors) as the optimizers see them: their local shard.

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces each parameter by a DTensor sharded along
dim 0 over a 1-D device mesh; its ``.grad`` is a DTensor of the same layout. The optimizers update
the local shards in place (``to_local()`` shares their storage), which is exact for per-coordinate
updates; what they need besides is where the shard lies in the whole parameter, for masks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["all_reduce_sum", "is_dtensor", "local_tensor", "shard_range"]


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_tensor(tensor: Tensor) -> Tensor:
    """The process's local shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_range(tensor: Tensor) -> tuple[int, int, int] | None:
    """``(dim, offset, length)`` of this process's shard of a DTensor sharded on one mesh dim, or
    None for a replicated one. Raises ValueError for layouts the optimizers do not handle."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"sharded parameters must live on a 1-D device mesh, got placements {placements}")
    placement = placements[0]
    if isinstance(placement, Replicate):
        return None
    if not isinstance(placement, Shard):
        raise ValueError(f"unsupported placement {placement} of a sharded parameter")
    dim = placement.dim % tensor.dim()
    size, world, rank = tensor.shape[dim], mesh.size(), mesh.get_local_rank()
    chunk = -(-size // world)  # torch.chunk's split, as DTensor shards: ceil(size / world) per rank
    offset = min(rank * chunk, size)
    length = min(chunk, size - offset)
    local = tensor.to_local()
    if local.shape[dim] != length:
        raise ValueError(f"shard of shape {tuple(local.shape)} does not match the expected length {length} of dim "
                         f"{dim} (global shape {tuple(tensor.shape)}, {world} shards)")
    return dim, offset, length


def all_reduce_sum(values: Tensor, group: Any) -> Tensor:
    """Sum ``values`` over the processes of ``group`` (a copy)."""
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values

