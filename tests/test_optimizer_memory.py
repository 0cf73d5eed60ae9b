"""Optimizers at real size (issue 12): bounded step temporaries, the same updates.

Both optimizers make their step's temporaries (fp32 copies of bf16 gradients, Sophia's ratio and
its denominator, Adam's square root) for at most ``foreach_chunk_numel`` coordinates at a time.
The update is per coordinate, so any chunking gives bit-identical weights and state, and the
step's peak memory stops growing with the model.
"""

from __future__ import annotations

import pytest
import torch

from simu_core.memtrack import TensorMemoryTracker
from simu_core.optim import ColumnMask, MaskedSophia, MasterAdamW


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (48, 64), (64, 96), (16, 16)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def _run(make, dtype, chunk, steps=3):
    params = _params(dtype)
    optimizer = make(params, chunk)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        if isinstance(optimizer, MaskedSophia):
            optimizer.update_hessian()
        optimizer.step()
    return params, optimizer


def _sophia(params, chunk):
    masks = {params[2]: ColumnMask(1, torch.tensor([5, 1, 40])), params[4]: torch.rand(16, 16, generator=torch.Generator().manual_seed(2)) > 0.5}
    return MaskedSophia(params, lr=1e-2, rho=0.05, weight_decay=0.1, masks=masks, foreach_chunk_numel=chunk)


def _adamw(params, chunk):
    return MasterAdamW(params, lr=1e-2, weight_decay=0.1, foreach_chunk_numel=chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [_sophia, _adamw], ids=["sophia", "adamw"])
def test_chunked_steps_are_bit_identical(make, dtype):
    whole, whole_opt = _run(make, dtype, chunk=2**30)
    for chunk in (1, 100, 3000):
        chunked, chunked_opt = _run(make, dtype, chunk)
        for p, q in zip(whole, chunked):
            assert torch.equal(p, q)
        for p, q in zip(whole, chunked):
            for key, value in whole_opt.state[p].items():
                other = chunked_opt.state[q][key]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    if make is _sophia:
        assert whole_opt.last_win_rate == chunked_opt.last_win_rate


@pytest.mark.parametrize("kind", ["sophia", "adamw"])
def test_step_temporaries_are_bounded_by_the_chunk(kind):
    params = [torch.nn.Parameter(torch.randn(256, 256, dtype=torch.bfloat16)) for _ in range(8)]
    optimizer = (MaskedSophia(params, lr=1e-2, foreach_chunk_numel=256 * 256) if kind == "sophia"
                 else MasterAdamW(params, lr=1e-2, foreach_chunk_numel=256 * 256))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # allocates the state
    tracker = TensorMemoryTracker()
    tracker.register([*params, *(p.grad for p in params)])
    tracker.register(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    before = tracker.live
    with tracker:
        if isinstance(optimizer, MaskedSophia):
            optimizer.update_hessian()
        optimizer.step()
    # One 256 x 256 tensor per chunk: a handful of fp32 temporaries of one tensor, not of all eight.
    assert tracker.peak - before <= 6 * 4 * 256 * 256
