"""MaskedSophia: SophiaG arithmetic, SIMU's exact freezing, compact/fp32 state, resume, win rate."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from simu_core.optim import ColumnMask, MaskedSophia, sample_gnb_labels


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))


def _set_grads(params, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        if p.requires_grad:
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def _run(opt, params, steps: int, k: int = 10, start: int = 0, bs: int = 64) -> None:
    """Random-gradient training loop: Hessian refresh every k steps (as gnb does), then a step."""
    for t in range(start, start + steps):
        if t % k == 0:
            _set_grads(params, seed=10_000 + t, scale=0.5)
            opt.update_hessian()
        _set_grads(params, seed=t)
        opt.step(bs=bs)


def test_unmasked_matches_reference_sophiag():
    from sophia_opt import SophiaG  # the authors' implementation (PyPI sophia-opt 0.2.2)

    ref_model, model = _mlp(), _mlp()
    hp = dict(lr=3e-3, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    ref = SophiaG(ref_model.parameters(), **hp)
    opt = MaskedSophia(model.parameters(), **hp)
    ref_params, params = list(ref_model.parameters()), list(model.parameters())
    start = [p.detach().clone() for p in params]
    _run(ref, ref_params, 20)
    _run(opt, params, 20)
    for r, p, p0 in zip(ref_params, params, start):
        torch.testing.assert_close(p, r, atol=1e-7, rtol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"], atol=1e-7, rtol=0)
        torch.testing.assert_close(opt.state[p]["hessian"], ref.state[r]["hessian"], atol=1e-7, rtol=0)
        assert not torch.equal(p, p0)
    assert opt.state[params[0]]["step"] == 20


@pytest.mark.parametrize("kind", ["dense", "columns_dim1", "columns_dim0"])
def test_all_ones_mask_equals_unmasked(kind):
    plain, masked = _mlp(), _mlp()
    params_plain, params_masked = list(plain.parameters()), list(masked.parameters())
    masks = {}
    for p in params_masked:
        if kind == "dense":
            masks[p] = torch.ones_like(p, dtype=torch.bool)
        elif p.dim() == 2:
            dim = 1 if kind == "columns_dim1" else 0
            masks[p] = ColumnMask(dim, torch.arange(p.shape[dim]))
    _run(MaskedSophia(params_plain, lr=1e-2, weight_decay=0.1), params_plain, 12, k=5)
    _run(MaskedSophia(params_masked, lr=1e-2, weight_decay=0.1, masks=masks), params_masked, 12, k=5)
    for a, b in zip(params_plain, params_masked):
        assert torch.equal(a, b)


def test_exact_freezing_under_weight_decay():
    torch.manual_seed(0)
    down_linear = nn.Parameter(torch.randn(6, 10))  # nn.Linear down projection [d_model, d_ff]
    down_conv1d = nn.Parameter(torch.randn(10, 6))  # GPT-2 Conv1D c_proj, stored [d_ff, d_model]
    attn = nn.Parameter(torch.randn(6, 6))  # fully trainable
    partial = nn.Parameter(torch.randn(5, 7))  # dense partial mask
    frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)
    params = [down_linear, down_conv1d, attn, partial, frozen]
    cols = torch.tensor([1, 4, 7])
    dense = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.4
    masks = {down_linear: ColumnMask(1, cols), down_conv1d: ColumnMask(0, cols), partial: dense}
    trainable = {
        id(down_linear): torch.zeros(6, 10, dtype=torch.bool).index_fill_(1, cols, True),
        id(down_conv1d): torch.zeros(10, 6, dtype=torch.bool).index_fill_(0, cols, True),
        id(attn): torch.ones(6, 6, dtype=torch.bool),
        id(partial): dense,
        id(frozen): torch.zeros(4, 4, dtype=torch.bool),
    }
    start = [p.detach().clone() for p in params]
    opt = MaskedSophia(params, lr=1e-2, weight_decay=0.5, masks=masks)
    for t in range(6):
        _set_grads(params, seed=t)
        partial.grad[~dense] = float("nan")  # a frozen coordinate's gradient must not matter at all
        if t % 3 == 0:
            opt.update_hessian()
        opt.step(bs=16)
    for p, p0 in zip(params, start):
        keep = trainable[id(p)]
        assert torch.equal(p[~keep], p0[~keep])  # bit-identical, weight decay included
        assert (p[keep] != p0[keep]).all()
    # Dense-mask state is also untouched (still its zero initialisation) outside the mask.
    assert torch.equal(opt.state[partial]["exp_avg"][~dense], torch.zeros(int((~dense).sum())))
    assert torch.equal(opt.state[partial]["hessian"][~dense], torch.zeros(int((~dense).sum())))
    assert torch.isfinite(partial).all()


def test_state_allocation_compact_and_fp32():
    torch.manual_seed(0)
    full = nn.Parameter(torch.randn(4, 6))
    cols = nn.Parameter(torch.randn(4, 6))
    rows = nn.Parameter(torch.randn(6, 4))
    no_grad_flag = nn.Parameter(torch.randn(3), requires_grad=False)
    zero_mask = nn.Parameter(torch.randn(3, 3))
    empty_cols = nn.Parameter(torch.randn(3, 3))
    grad_none = nn.Parameter(torch.randn(2))
    low = nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    params = [full, cols, rows, no_grad_flag, zero_mask, empty_cols, grad_none, low]
    masks = {
        cols: ColumnMask(1, torch.tensor([0, 5])),
        rows: ColumnMask(0, torch.tensor([2])),
        zero_mask: torch.zeros(3, 3, dtype=torch.bool),
        empty_cols: ColumnMask(1, torch.tensor([], dtype=torch.long)),
        low: ColumnMask(1, torch.tensor([1, 2, 3])),
    }
    opt = MaskedSophia(params, lr=1e-5, weight_decay=0.1, masks=masks)
    master0 = None
    for t in range(3):
        _set_grads([p for p in params if p is not grad_none], seed=t)
        opt.update_hessian()
        opt.step(bs=8)
        if master0 is None:
            master0 = low.detach().float()[:, 1:4].clone()
    assert set(map(id, opt.state)) == {id(full), id(cols), id(rows), id(low)}
    assert opt.state[cols]["exp_avg"].shape == (4, 2) and opt.state[cols]["hessian"].shape == (4, 2)
    assert opt.state[rows]["exp_avg"].shape == (1, 4)
    for s in opt.state.values():
        assert s["exp_avg"].dtype == s["hessian"].dtype == torch.float32
    master = opt.state[low]["master"]
    assert master.dtype == torch.float32 and master.shape == (4, 3)
    # 1e-5 steps are below bf16 resolution for O(1) weights but accumulate in the fp32 master.
    assert (master - master0).abs().max() > 5e-6
    assert torch.equal(low.float()[:, 1:4], master.to(torch.bfloat16).float())  # param = rounded master
    n_fp32_coords = 4 * 6 + 4 * 2 + 1 * 4
    assert opt.state_bytes() == 2 * 4 * n_fp32_coords + 3 * 4 * (4 * 3)


def test_state_dict_round_trip_resumes_bit_identically():
    def build(model):
        ps = list(model.parameters())
        ps[1].data = ps[1].data.to(torch.bfloat16)  # exercise the fp32 master through a checkpoint
        masks = {ps[0]: ColumnMask(1, torch.tensor([0, 3, 5])), ps[2]: torch.rand(ps[2].shape) < 0.5}
        return ps, MaskedSophia(ps, lr=1e-2, weight_decay=0.1, masks=masks)

    torch.manual_seed(0)
    model = _mlp()
    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    params_a, opt_a = build(model_a)
    _run(opt_a, params_a, 10, k=3)

    torch.manual_seed(1)
    params_b, opt_b = build(model_b)
    _run(opt_b, params_b, 5, k=3)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    del opt_b, params_b, model_b

    model_c = copy.deepcopy(model)
    torch.manual_seed(1)
    params_c, opt_c = build(model_c)
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["optim"])
    assert opt_c.state[params_c[1]]["master"].dtype == torch.float32
    _run(opt_c, params_c, 5, k=3, start=5)
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


def test_load_state_dict_rejects_mismatched_mask():
    p = nn.Parameter(torch.randn(4, 6))
    opt = MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(1, torch.tensor([0, 1]))})
    _set_grads([p], seed=0)
    opt.step()
    q = nn.Parameter(torch.randn(4, 6))
    other = MaskedSophia([q], lr=1e-3, masks={q: ColumnMask(1, torch.tensor([0, 1, 2]))})
    with pytest.raises(ValueError, match=r"expects \(4, 3\)"):
        other.load_state_dict(opt.state_dict())


def test_win_rate_hand_computed():
    a = nn.Parameter(torch.zeros(2, 3))
    b = nn.Parameter(torch.zeros(2, 3))
    mask_a = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    opt = MaskedSophia([a, b], lr=0.1, betas=(0.5, 0.5), rho=1.0, weight_decay=0.0,
                       masks={a: mask_a, b: ColumnMask(1, torch.tensor([0, 2]))})
    assert opt.last_win_rate is None
    # h = 0.5 * gh^2, m = 0.5 * g = 0.5, ratio = min(0.5 / h, 1)
    a.grad = torch.tensor([[0.1, 1.0, 2.0], [4.0, 4.0, 4.0]])  # ratios 1, 1 (=1 is clipped), 0.25 | 1/16, frozen, frozen
    b.grad = torch.tensor([[0.0, 3.0, 3.0], [1.0, 3.0, 0.1]])  # cols 0, 2: ratios 1 (h=0), 1/9 | 1, 1
    opt.update_hessian()
    a.grad, b.grad = torch.ones(2, 3), torch.ones(2, 3)
    opt.step(bs=1)
    assert opt.last_win_rate == 3 / 8
    assert 0.0 <= opt.last_win_rate <= 1.0


def test_update_hessian_respects_masks():
    p = nn.Parameter(torch.randn(3, 4))
    mask = torch.tensor([[1, 0, 0, 1]] * 3, dtype=torch.bool)
    opt = MaskedSophia([p], lr=1e-3, masks={p: mask})
    p.grad = torch.full((3, 4), 2.0)
    opt.update_hessian()
    h = opt.state[p]["hessian"]
    assert torch.equal(h[mask], torch.full((6,), (1 - 0.99) * 4.0))
    assert torch.equal(h[~mask], torch.zeros(6))


def test_sample_gnb_labels_is_seeded_categorical():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    a = sample_gnb_labels(logits, torch.Generator().manual_seed(3))
    b = sample_gnb_labels(logits, torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (2, 5) and torch.equal(a, b)
    peaked = torch.full((4, 7), -1e4)
    peaked[:, 2] = 0.0
    assert torch.equal(sample_gnb_labels(peaked), torch.full((4,), 2))
    # Frequencies follow softmax (not argmax): two equal logits are both sampled.
    flat = torch.zeros(2000, 2)
    share = sample_gnb_labels(flat, torch.Generator().manual_seed(0)).float().mean()
    assert 0.4 < share < 0.6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=1e-3, betas=(0.9, 1.0)), r"betas must be two values in \[0, 1\)"),
        (dict(lr=1e-3, betas=(-0.1, 0.9)), "betas"),
        (dict(lr=1e-3, rho=0.0), "rho must be > 0"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(lr=1e-3, hessian_batch_size=0), "hessian_batch_size must be > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedSophia([nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_masks():
    p = nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"mask shape \(6, 4\) does not match parameter shape \(4, 6\)"):
        MaskedSophia([p], lr=1e-3, masks={p: torch.ones(6, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"\[0, 6\).*max 6"):
        MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(1, torch.tensor([0, 6]))})
    with pytest.raises(ValueError, match=r"\[0, 4\).*min -1"):
        MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(0, torch.tensor([-1]))})
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(2, torch.tensor([0]))})
    with pytest.raises(ValueError, match="duplicates"):
        MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(1, torch.tensor([1, 1]))})
    with pytest.raises(ValueError, match="1-D integer tensor"):
        MaskedSophia([p], lr=1e-3, masks={p: ColumnMask(1, torch.tensor([0.0, 1.0]))})
    with pytest.raises(ValueError, match="only 0 and 1"):
        MaskedSophia([p], lr=1e-3, masks={p: torch.full((4, 6), 0.5)})
    with pytest.raises(ValueError, match="must be None, a bool tensor or a ColumnMask"):
        MaskedSophia([p], lr=1e-3, masks={p: [1, 0]})
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not among the optimizer's params"):
        MaskedSophia([p], lr=1e-3, masks={stranger: None})
    with pytest.raises(ValueError, match="2 entries for 1 params"):
        MaskedSophia([{"params": [p], "masks": [None, None]}], lr=1e-3)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        MaskedSophia([nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=1e-3)


def test_param_group_masks_key():
    p = nn.Parameter(torch.randn(3, 5))
    q = nn.Parameter(torch.randn(5, 3))
    p0, q0 = p.detach().clone(), q.detach().clone()
    opt = MaskedSophia([{"params": [p, q], "masks": [ColumnMask(1, torch.tensor([2])), None]}], lr=1e-2)
    assert "masks" not in opt.param_groups[0]  # kept out of state_dict's param_groups
    _set_grads([p, q], seed=0)
    opt.update_hessian()
    opt.step()
    changed = p != p0
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4]].any()
    assert (q != q0).all()
