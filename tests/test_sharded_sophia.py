"""Masked Sophia on sharded parameters (issue 12): each process updates its shard as one process would.

Two ranks of a fake process group (in this process, one after the other) hold dim-0 shards of the
same parameters (uneven: 10 rows over 2). Every kind of mask is given for the whole parameter:
column masks on the sharded dim (GPT-2's Conv1D neurons) and across it (Llama's down projection),
a dense mask, none. After two steps each shard must equal the same rows of an unsharded run, the
frozen entries must not have moved, and the state must be compact per shard.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from simu_core.optim import ColumnMask, MaskedSophia, MasterAdamW

SHAPE = (10, 6)


def _tensors():
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(SHAPE, generator=generator) for _ in range(4)]
    grads = [[torch.randn(SHAPE, generator=generator) for _ in range(4)] for _ in range(2)]
    dense = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) > 0.5
    masks = [ColumnMask(0, torch.tensor([7, 1, 4])), ColumnMask(1, torch.tensor([5, 2])), dense, None]
    return params, grads, masks


def _run(params, grads, masks, wrap=lambda t: t):
    params = [torch.nn.Parameter(wrap(p.clone())) for p in params]
    optimizer = MaskedSophia(params, lr=0.05, rho=0.05, weight_decay=0.1, masks=dict(zip(params, masks)))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = wrap(g.clone())
        optimizer.update_hessian()
        optimizer.step()
    return params, optimizer


@pytest.fixture()
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(rank: int):
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
        return init_device_mesh("cpu", (2,))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_shard_is_updated_as_the_same_rows_of_one_process(fake_group, rank):
    from torch.distributed.tensor import DTensor, Shard

    params, grads, masks = _tensors()
    whole, _ = _run(params, grads, masks)
    mesh = fake_group(rank)
    rows = slice(5 * rank, 5 * rank + 5)

    def shard(tensor):
        return DTensor.from_local(tensor[rows].clone(), mesh, [Shard(0)], run_check=False, shape=tensor.shape,
                                  stride=tensor.stride())

    sharded, optimizer = _run(params, grads, masks, shard)
    for index, (p, q) in enumerate(zip(sharded, whole)):
        torch.testing.assert_close(p.to_local(), q.detach()[rows], rtol=0, atol=0, msg=f"param {index}")
    # Frozen entries untouched: rows of the column mask on dim 0 outside {7, 1, 4} ...
    kept = [r for r in range(rows.start, rows.stop) if r not in (7, 1, 4)]
    assert torch.equal(sharded[0].to_local()[[r - rows.start for r in kept]], params[0][kept])
    # ... and compact state: this shard's critical rows only, in the mask's order.
    expected_rows = {0: 2, 1: 1}[rank]  # rank 0 holds rows 1 and 4, rank 1 row 7
    assert optimizer.state[sharded[0]]["exp_avg"].shape == (expected_rows, 6)
    assert optimizer.state[sharded[1]]["exp_avg"].shape == (5, 2)


def test_adamw_updates_shards_as_one_process(fake_group):
    from torch.distributed.tensor import DTensor, Shard

    generator = torch.Generator().manual_seed(2)
    weight, grad = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    whole = torch.nn.Parameter(weight.clone())
    whole.grad = grad.clone()
    MasterAdamW([whole], lr=0.01).step()
    mesh = fake_group(1)
    local = torch.nn.Parameter(DTensor.from_local(weight[5:].clone(), mesh, [Shard(0)], run_check=False,
                                                  shape=weight.shape, stride=weight.stride()))
    local.grad = DTensor.from_local(grad[5:].clone(), mesh, [Shard(0)], run_check=False, shape=grad.shape,
                                    stride=grad.stride())
    MasterAdamW([local], lr=0.01).step()
    assert torch.equal(local.to_local(), whole.detach()[5:])
