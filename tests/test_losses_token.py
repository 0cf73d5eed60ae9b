"""UNDIAL, WGA, SatImp, CE-U and PDU against their published formulas, restated position by position.

Each oracle below loops over (row, position) and writes the formula out with plain tensor ops on one
vocabulary vector at a time (its own softmax, no helper of the module, no ``token_logprobs``), as
open-unlearning computes it (``src/trainer/utils.py``, ``src/trainer/unlearn/{ceu,pdu}.py``). The module
scores in float32, the oracles in float64: values and gradients must agree within 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simu_core.prompting import IGNORE_INDEX
from simu_core.unlearning.losses import (
    OPEN_UNLEARNING_DEFAULTS,
    ceu_loss,
    pdu_dual_update,
    pdu_forget_loss,
    satimp_loss,
    undial_loss,
    wga_loss,
)

B, T, V = 4, 7, 11
TOL = {"rtol": 1e-6, "atol": 1e-6}
P = IGNORE_INDEX
# Row 0: 3 prompt + 4 answer; row 1: 2 prompt + 3 answer + 2 padding; row 2: 4 prompt + 2 answer +
# 1 padding; row 3: a padded row without any label.
LAYOUT = [
    [P, P, P, 1, 1, 1, 1],
    [P, P, 1, 1, 1, P, P],
    [P, P, P, P, 1, 1, P],
    [P, P, P, P, P, P, P],
]


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    logits = 2.0 * torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    reference = logits + 0.7 * torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    labels = torch.where(torch.tensor(LAYOUT) == 1, tokens, torch.full_like(tokens, P))
    return logits, labels, reference


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    m = z.max()
    return z - m - torch.log(torch.exp(z - m).sum())


def _answer_positions(labels: torch.Tensor):
    """(row, position, next token) for every position whose next label is set."""
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                yield b, t, y


def oracle_undial(logits, labels, reference, beta, all_positions=False):
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX and not all_positions:
                continue
            teacher = reference[b, t].detach().clone()
            if y != IGNORE_INDEX:
                teacher[y] = teacher[y] - beta
            q = _softmax(teacher)
            terms.append(-(q * _log_softmax(logits[b, t])).sum())
    return torch.stack(terms).mean()


def oracle_weighted_ascent(logits, labels, beta1, beta2):
    terms = []
    for b, t, y in _answer_positions(labels):
        p = _softmax(logits[b, t])[y]
        ce = -torch.log(p)
        w = p.detach() ** beta1 * (1 - p.detach()) ** beta2
        terms.append(-w * ce)
    return torch.stack(terms).mean()


def oracle_ceu(logits, labels, n):
    terms = []
    for b in range(labels.shape[0]):
        seen = 0
        for j in range(labels.shape[1]):
            y = int(labels[b, j])
            if y == IGNORE_INDEX:
                continue
            seen += 1
            if seen <= n or j == 0:
                continue
            z = logits[b, j - 1]
            others = [v for v in range(z.shape[0]) if v != y]
            e = torch.exp(z.detach()[others])
            q = e / e.sum()
            logp = _log_softmax(z)[others]
            terms.append(-(q * logp).sum())
    return torch.stack(terms).mean()


def oracle_pdu(logits, labels, all_positions=False):
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not all_positions and int(labels[b, t]) == IGNORE_INDEX:
                continue
            z = logits[b, t]
            terms.append((z.max() - z.sum() / z.shape[0]) ** 2)
    return torch.stack(terms).mean()


def _check(module_fn, oracle_fn, logits):
    """Values and gradients w.r.t. the logits of the module and the oracle agree."""
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    got, expected = module_fn(x), oracle_fn(y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, **TOL)
    (got_grad,) = torch.autograd.grad(got, x)
    (expected_grad,) = torch.autograd.grad(expected, y)
    torch.testing.assert_close(got_grad, expected_grad, **TOL)
    return got_grad


def test_the_fixture_has_prompt_padding_and_an_empty_row(batch):
    _, labels, _ = batch
    assert (labels[:, 0] == IGNORE_INDEX).all() and (labels[3] == IGNORE_INDEX).all()
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == 9


# --- UNDIAL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 10.0])
def test_undial_matches_formula(batch, beta):
    logits, labels, reference = batch
    grad = _check(
        lambda x: undial_loss(x, labels, reference, beta),
        lambda x: oracle_undial(x, labels, reference, beta),
        logits,
    )
    # Only the answer positions are distilled.
    answer = torch.zeros(B, T, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert (grad[~answer] == 0).all() and (grad[answer].abs().sum(-1) > 0).all()


def test_undial_all_positions_matches_open_unlearning_averaging(batch):
    logits, labels, reference = batch
    grad = _check(
        lambda x: undial_loss(x, labels, reference, 10.0, all_positions=True),
        lambda x: oracle_undial(x, labels, reference, 10.0, all_positions=True),
        logits,
    )
    assert grad[0, 0].abs().sum() > 0  # a prompt position is distilled to the reference too
    assert not torch.isclose(
        undial_loss(logits, labels, reference, 10.0, all_positions=True), undial_loss(logits, labels, reference, 10.0)
    )


def test_undial_is_minimal_at_the_adjusted_teacher(batch):
    _, labels, reference = batch
    beta = 3.0
    adjusted = reference.clone()
    for b, t, y in _answer_positions(labels):
        adjusted[b, t, y] -= beta
    x = adjusted.clone().requires_grad_(True)
    loss = undial_loss(x, labels, reference, beta)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() < 1e-7
    for scale in (0.1, 1.0):
        noise = torch.randn(adjusted.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        moved = adjusted + scale * noise
        assert undial_loss(moved, labels, reference, beta) > loss


def test_undial_lowers_the_true_token_from_the_reference(batch):
    _, labels, reference = batch
    x = reference.clone().requires_grad_(True)  # the model starts as the reference
    (grad,) = torch.autograd.grad(undial_loss(x, labels, reference, 10.0), x)
    for b, t, y in _answer_positions(labels):
        assert grad[b, t, y] > 0  # gradient descent lowers the true token's logit
    (grad0,) = torch.autograd.grad(undial_loss(x, labels, reference, 0.0), x)
    assert grad0.abs().max() < 1e-7  # beta = 0: plain self-distillation, already at its minimum


def test_undial_reference_gets_no_gradient(batch):
    logits, labels, reference = batch
    ref = reference.clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    for all_positions in (False, True):
        loss = undial_loss(x, labels, ref, 10.0, all_positions=all_positions)
        grad_x, grad_ref = torch.autograd.grad(loss, (x, ref), allow_unused=True)
        assert grad_ref is None and grad_x is not None


# --- WGA and SatImp ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
def test_wga_matches_formula(batch, beta):
    logits, labels, _ = batch
    _check(lambda x: wga_loss(x, labels, beta), lambda x: oracle_weighted_ascent(x, labels, beta, 0.0), logits)


def test_wga_beta_zero_is_gradient_ascent(batch):
    logits, labels, _ = batch
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(wga_loss(logits, labels, 0.0).double(), -ce, **TOL)
    assert wga_loss(logits, labels, 1.0) > -ce  # p <= 1 weights shrink the ascent term


def test_wga_weight_is_not_differentiated(batch):
    logits, labels, _ = batch
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(wga_loss(x, labels, 2.0), x)
    n = sum(1 for _ in _answer_positions(labels))
    for b, t, y in _answer_positions(labels):
        p = torch.softmax(logits[b, t], -1)
        onehot = F.one_hot(torch.tensor(y), V).double()
        # d/dz of -(w * CE) with w = p_y^2 constant: -w * (p - onehot) / n
        torch.testing.assert_close(grad[b, t], -(p[y] ** 2) * (p - onehot) / n, **TOL)


@pytest.mark.parametrize(("beta1", "beta2"), [(5.0, 1.0), (1.0, 2.0), (0.0, 0.0), (2.5, 0.5)])
def test_satimp_matches_formula(batch, beta1, beta2):
    logits, labels, _ = batch
    _check(
        lambda x: satimp_loss(x, labels, beta1, beta2),
        lambda x: oracle_weighted_ascent(x, labels, beta1, beta2),
        logits,
    )


def test_satimp_without_importance_is_wga(batch):
    logits, labels, _ = batch
    torch.testing.assert_close(satimp_loss(logits, labels, 2.0, 0.0), wga_loss(logits, labels, 2.0))
    assert not torch.isclose(satimp_loss(logits, labels, 2.0, 1.0), wga_loss(logits, labels, 2.0))


# --- CE-U ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ceu_matches_formula(batch, n):
    logits, labels, _ = batch
    _check(lambda x: ceu_loss(x, labels, n), lambda x: oracle_ceu(x, labels, n), logits)


def test_ceu_skips_the_first_answer_token_and_pushes_the_true_token_down(batch):
    logits, labels, _ = batch
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ceu_loss(x, labels), x)  # default: ignore the first answer token
    assert OPEN_UNLEARNING_DEFAULTS["ceu"]["ignore_first_n_answer_tokens"] == 1
    # The positions predicting each row's first answer token (the last prompt token) are not scored.
    assert grad[0, 2].abs().max() == 0 and grad[1, 1].abs().max() == 0 and grad[2, 3].abs().max() == 0
    scored = [(b, t, y) for b, t, y in _answer_positions(labels) if (b, t) not in {(0, 2), (1, 1), (2, 3)}]
    for b, t, y in scored:
        p = torch.softmax(logits[b, t], -1)
        q = p.clone()
        q[y] = 0
        q = q / q.sum()
        # gradient p - q over the scored positions: positive on the true token, negative elsewhere
        torch.testing.assert_close(grad[b, t], (p - q) / len(scored), **TOL)
        assert grad[b, t, y] > 0


def test_ceu_validates_n():
    with pytest.raises(ValueError):
        ceu_loss(torch.zeros(1, 3, V), torch.zeros(1, 3, dtype=torch.long), -1)


# --- PDU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("all_positions", [False, True])
def test_pdu_forget_loss_matches_formula(batch, all_positions):
    logits, labels, _ = batch
    _check(
        lambda x: pdu_forget_loss(x, labels, all_positions=all_positions),
        lambda x: oracle_pdu(x, labels, all_positions=all_positions),
        logits,
    )


def test_pdu_forget_loss_uses_unshifted_labelled_positions(batch):
    logits, labels, _ = batch
    base = pdu_forget_loss(logits, labels)
    last_prompt = logits.clone()
    last_prompt[0, 2] += torch.linspace(-3, 3, V, dtype=torch.float64)  # predicts the first answer token
    torch.testing.assert_close(pdu_forget_loss(last_prompt, labels), base)
    last_label = logits.clone()
    last_label[0, 6] += torch.linspace(-3, 3, V, dtype=torch.float64)  # the last labelled position
    assert not torch.isclose(pdu_forget_loss(last_label, labels), base)
    padding = logits.clone()
    padding[3] += 5 * torch.linspace(-3, 3, V, dtype=torch.float64)
    torch.testing.assert_close(pdu_forget_loss(padding, labels), base)
    all_base = pdu_forget_loss(logits, labels, all_positions=True)
    assert not torch.isclose(pdu_forget_loss(padding, labels, all_positions=True), all_base)


def test_pdu_forget_loss_is_zero_at_uniform_outputs(batch):
    _, labels, _ = batch
    flat = torch.full((B, T, V), 0.3, dtype=torch.float64, requires_grad=True)
    loss = pdu_forget_loss(flat, labels)
    (grad,) = torch.autograd.grad(loss, flat)
    assert loss.abs() < 1e-12 and grad.abs().max() < 1e-6  # float32 mean of equal values: ~1e-16 off
    peaked = flat.detach().clone()
    peaked[0, 4, 2] += 1.0
    assert pdu_forget_loss(peaked, labels) > 0


def test_pdu_dual_update_is_projected_ascent():
    assert pdu_dual_update(1.0, 0.5, 0.2, 2.0) == pytest.approx(1.6)  # 1 + 2 * (0.5 - 0.2)
    assert pdu_dual_update(1.0, 0.1, 0.3, 1.0) == pytest.approx(0.8)  # slack shrinks the weight
    assert pdu_dual_update(0.5, 0.1, 1.0, 1.0) == 0.0  # 0.5 - 0.9 < 0: projected at 0
    assert pdu_dual_update(0.0, 0.0, 1.0, 5.0) == 0.0
    tensor_loss = torch.tensor(0.9, requires_grad=True)
    value = pdu_dual_update(2.0, tensor_loss * 1.0, 0.4, 0.5)
    assert isinstance(value, float) and value == pytest.approx(2.25)


# --- shared conventions --------------------------------------------------------------------------


def test_answerless_batches_give_zero_with_a_zero_gradient():
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 0] = 4  # a label at position 0 is never predicted
    for loss in (
        undial_loss(logits, labels, logits.detach(), 10.0),
        wga_loss(logits, labels, 1.0),
        satimp_loss(logits, labels, 5.0, 1.0),
        ceu_loss(logits, labels, 0),
    ):
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss == 0 and (grad == 0).all()
    one_answer = torch.full((2, 5), IGNORE_INDEX)
    one_answer[0, 3] = 1
    assert ceu_loss(logits, one_answer, 1) == 0  # its only answer token is ignored
    assert ceu_loss(logits, one_answer, 0) > 0


def test_low_precision_logits_are_scored_in_float32(batch):
    logits, labels, reference = batch
    half = logits.bfloat16()
    up = half.float()
    pairs = [
        (
            undial_loss(half, labels, reference.bfloat16(), 10.0),
            undial_loss(up, labels, reference.bfloat16().float(), 10.0),
        ),
        (wga_loss(half, labels, 1.0), wga_loss(up, labels, 1.0)),
        (satimp_loss(half, labels, 5.0, 1.0), satimp_loss(up, labels, 5.0, 1.0)),
        (ceu_loss(half, labels), ceu_loss(up, labels)),
        (pdu_forget_loss(half, labels), pdu_forget_loss(up, labels)),
    ]
    for low, full in pairs:
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, full)


def test_defaults_are_open_unlearnings():
    assert OPEN_UNLEARNING_DEFAULTS["undial"]["beta"] == 10.0
    assert OPEN_UNLEARNING_DEFAULTS["wga"]["beta"] == 1.0
    assert (OPEN_UNLEARNING_DEFAULTS["satimp"]["beta1"], OPEN_UNLEARNING_DEFAULTS["satimp"]["beta2"]) == (5.0, 1.0)
    pdu = OPEN_UNLEARNING_DEFAULTS["pdu"]
    assert (pdu["retain_loss_eps"], pdu["dual_step_size"], pdu["primal_dual"]) == (0.0, 1.0, False)
