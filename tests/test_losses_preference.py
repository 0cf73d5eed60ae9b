"""DPO / IdkDPO, AltPO and RMU losses against their published formulas, written out independently here.

The oracles loop over sequences and positions in float64 and use neither the module's helpers nor
``token_logprobs``: a sequence's log-probability is the sum over t of ``z[t, y] - logsumexp(z[t])`` with
``y = labels[t + 1]`` wherever that label is not -100 (open-unlearning's ``compute_batch_nll``); RMU's
activation loss averages ``mean_d (a - target)^2`` over the positions t with ``labels[t] != -100`` (the
UNSHIFTED labels, as open-unlearning's ``compute_activation_loss`` is called), then over sequences.
"""

from __future__ import annotations

import math

import pytest
import torch

from simu_core.unlearning.losses import (
    OPEN_UNLEARNING_DEFAULTS,
    WMDP_RMU_ZEPHYR,
    activation_mse,
    altpo_loss,
    dpo_loss,
    rmu_answer_mask,
    rmu_control_vector,
)

B, T, V, D = 3, 7, 11, 5
IGNORE = -100


def _labels(generator: torch.Generator, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """[B, T] labels: -100 on each row's prompt, random tokens on its answer, -100 on the padding after it."""
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for row, (start, length) in enumerate(zip(prompt, answer)):
        labels[row, start : start + length] = torch.randint(0, V, (length,), generator=generator)
    return labels


@pytest.fixture()
def batch():
    """A fixed random pair batch: row 0 unpadded, rows 1 and 2 padded; win and lose answers differ in length."""
    generator = torch.Generator().manual_seed(1234)

    def logits():
        return (3 * torch.randn(B, T, V, generator=generator)).requires_grad_(True)

    return {
        "win_labels": _labels(generator, prompt=[2, 3, 1], answer=[5, 2, 3]),
        "lose_labels": _labels(generator, prompt=[2, 3, 1], answer=[5, 4, 1]),
        "win_logits": logits(),
        "lose_logits": logits(),
        "reference_win_logits": logits(),
        "reference_lose_logits": logits(),
    }


def _sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, row: int) -> torch.Tensor:
    """sum_t log softmax(z[row, t])[labels[row, t + 1]] over labelled next tokens, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(labels.shape[1] - 1):
        target = int(labels[row, t + 1])
        if target == IGNORE:
            continue
        z = logits[row, t].double()
        total = total + z[target] - torch.logsumexp(z, dim=0)
    return total


def _dpo_oracle(batch: dict, beta: float) -> torch.Tensor:
    """mean_i -(2/beta) log sigmoid(beta * ((lw - lw_ref) - (ll - ll_ref))), open-unlearning's compute_dpo_loss."""
    terms = []
    for row in range(B):
        win = _sequence_logprob(batch["win_logits"], batch["win_labels"], row) - _sequence_logprob(
            batch["reference_win_logits"].detach(), batch["win_labels"], row
        )
        lose = _sequence_logprob(batch["lose_logits"], batch["lose_labels"], row) - _sequence_logprob(
            batch["reference_lose_logits"].detach(), batch["lose_labels"], row
        )
        margin = win - lose
        terms.append(-(2.0 / beta) * torch.log(1.0 / (1.0 + torch.exp(-beta * margin))))
    return torch.stack(terms).mean()


def _args(batch: dict) -> tuple:
    return (batch["win_logits"], batch["win_labels"], batch["lose_logits"], batch["lose_labels"],
            batch["reference_win_logits"], batch["reference_lose_logits"])


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-6, absolute for values up to 1 and relative above (float32 carries ~7 digits)."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("loss", [dpo_loss, altpo_loss], ids=["dpo", "altpo"])
def test_preference_losses_match_the_formula_and_its_gradient(batch, loss, beta):
    actual = loss(*_args(batch), beta)
    expected = _dpo_oracle(batch, beta)
    assert actual.dtype == torch.float32
    _assert_close(actual, expected)
    actual_grads = torch.autograd.grad(actual, (batch["win_logits"], batch["lose_logits"]))
    expected_grads = torch.autograd.grad(expected, (batch["win_logits"], batch["lose_logits"]))
    for got, want in zip(actual_grads, expected_grads):
        _assert_close(got, want)
    # Prompt and padding positions get no gradient (the last position predicts nothing either).
    for got, labels in zip(actual_grads, (batch["win_labels"], batch["lose_labels"])):
        predicts_nothing = torch.cat([labels[:, 1:] == IGNORE, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        assert torch.all(got[predicts_nothing] == 0)


def test_dpo_equals_two_log_two_over_beta_when_the_model_is_the_reference(batch):
    beta = 0.1
    args = (batch["win_logits"], batch["win_labels"], batch["lose_logits"], batch["lose_labels"],
            batch["win_logits"].detach().clone(), batch["lose_logits"].detach().clone())
    value = dpo_loss(*args, beta)
    assert value.item() == pytest.approx(2 * math.log(2) / beta, abs=1e-6)
    assert OPEN_UNLEARNING_DEFAULTS["dpo"]["beta"] == 0.1
    # At that point the gradient is beta-free: -(2/beta) * sigmoid(0) * beta * d(margin) = -d(margin).
    grad_small = torch.autograd.grad(dpo_loss(*args, 0.05), batch["win_logits"])[0]
    grad_large = torch.autograd.grad(dpo_loss(*args, 5.0), batch["win_logits"])[0]
    _assert_close(grad_small, grad_large)


def test_dpo_prefers_the_win_answer(batch):
    """Minimising moves probability from the lose (forget) answer to the win answer."""
    args = _args(batch)
    win_grad, lose_grad = torch.autograd.grad(dpo_loss(*args, 0.1), (batch["win_logits"], batch["lose_logits"]))
    step = 1.0
    with torch.no_grad():
        moved = (batch["win_logits"] - step * win_grad, batch["win_labels"],
                 batch["lose_logits"] - step * lose_grad, batch["lose_labels"], *args[4:])
        assert dpo_loss(*moved, 0.1) < dpo_loss(*args, 0.1)


@pytest.mark.parametrize("loss", [dpo_loss, altpo_loss], ids=["dpo", "altpo"])
def test_the_reference_gets_no_gradient(batch, loss):
    for name in ("reference_win_logits", "reference_lose_logits"):
        assert batch[name].requires_grad
    loss(*_args(batch), 0.1).backward()
    assert batch["reference_win_logits"].grad is None and batch["reference_lose_logits"].grad is None
    assert batch["win_logits"].grad is not None and batch["lose_logits"].grad is not None


def test_altpo_is_dpo_with_the_alternate_preferred(batch):
    """AltPO = DPO(win = alternate, lose = forget); several alternates of one question are several rows."""
    args = _args(batch)
    _assert_close(altpo_loss(*args, 0.1), dpo_loss(*args, 0.1))
    # The same forget answer against two alternates = the mean of the two pairs' losses.
    rows = torch.tensor([0, 0])
    alternates = torch.cat([batch["win_logits"][:1], batch["lose_logits"][1:2]])
    alternate_labels = torch.cat([batch["win_labels"][:1], batch["lose_labels"][1:2]])
    reference_alternates = torch.cat([batch["reference_win_logits"][:1], batch["reference_lose_logits"][1:2]])
    both = altpo_loss(alternates, alternate_labels, batch["lose_logits"][rows], batch["lose_labels"][rows],
                      reference_alternates, batch["reference_lose_logits"][rows], 0.1)
    first = altpo_loss(*(tensor[:1] for tensor in args[:4]), *(tensor[:1] for tensor in args[4:]), 0.1)
    second = altpo_loss(alternates[1:], alternate_labels[1:], batch["lose_logits"][:1], batch["lose_labels"][:1],
                        reference_alternates[1:], batch["reference_lose_logits"][:1], 0.1)
    _assert_close(both, (first + second) / 2)


def test_preference_pairs_must_have_as_many_rows(batch):
    args = list(_args(batch))
    args[2], args[3], args[5] = args[2][:2], args[3][:2], args[5][:2]
    with pytest.raises(ValueError, match="pairs"):
        dpo_loss(*args, 0.1)


def test_dpo_scores_low_precision_logits_in_float32(batch):
    args = [tensor.detach().to(torch.bfloat16) if tensor.is_floating_point() else tensor for tensor in _args(batch)]
    upcast = [tensor.float() if tensor.is_floating_point() else tensor for tensor in args]
    value = dpo_loss(*args, 0.1)
    assert value.dtype == torch.float32
    _assert_close(value, dpo_loss(*upcast, 0.1))


# ---------------------------------------------------------------------------------------------------- RMU


def test_control_vector_is_reproducible_and_has_the_coefficients_norm():
    first = rmu_control_vector(64, 6.5, torch.Generator().manual_seed(7))
    again = rmu_control_vector(64, 6.5, torch.Generator().manual_seed(7))
    other = rmu_control_vector(64, 6.5, torch.Generator().manual_seed(8))
    assert first.shape == (1, 1, 64) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.linalg.vector_norm(first).item() == pytest.approx(6.5, rel=1e-6)
    assert bool((first >= 0).all())  # uniform [0, 1) before scaling: all entries non-negative
    # The global RNG is neither read nor advanced.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        before = torch.random.get_rng_state()
        rmu_control_vector(64, 300.0, torch.Generator().manual_seed(7))
        assert torch.equal(torch.random.get_rng_state(), before)
    # open-unlearning's get_control_vector after torch.manual_seed(7): the same vector.
    with torch.random.fork_rng():
        torch.manual_seed(7)
        random_vector = torch.rand(1, 1, 64)
        published = random_vector / torch.norm(random_vector) * 6.5
    assert torch.equal(first, published)
    with pytest.raises(ValueError, match="steering_coeff"):
        rmu_control_vector(64, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="hidden_size"):
        rmu_control_vector(0, 1.0, torch.Generator())


def _activation_oracle(activations: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_b [sum_{t: labels[b,t] != -100} mean_d (a - target)^2] / #{t: labels[b,t] != -100}, float64."""
    target = target.detach().double().expand(activations.shape)
    per_sequence = []
    for row in range(activations.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for t in range(activations.shape[1]):
            if int(labels[row, t]) == IGNORE:  # the UNSHIFTED label: the answer token's own position
                continue
            total = total + ((activations[row, t].double() - target[row, t]) ** 2).mean()
            count += 1
        per_sequence.append(total / count)
    return torch.stack(per_sequence).mean()


@pytest.fixture()
def hidden():
    generator = torch.Generator().manual_seed(99)
    labels = _labels(generator, prompt=[2, 3, 1], answer=[5, 2, 3])
    activations = torch.randn(B, T, D, generator=generator).requires_grad_(True)
    reference = torch.randn(B, T, D, generator=generator).requires_grad_(True)
    return labels, activations, reference


def test_activation_mse_matches_the_formula_forget_and_retain(hidden):
    labels, activations, reference = hidden
    control = rmu_control_vector(D, 20.0, torch.Generator().manual_seed(3))
    mask = rmu_answer_mask(labels)
    assert torch.equal(mask, labels != IGNORE)
    for target in (control, reference):  # the forget term's control vector, the retain term's reference
        actual = activation_mse(activations, target, mask)
        expected = _activation_oracle(activations, target, labels)
        assert actual.dtype == torch.float32
        _assert_close(actual, expected)
        _assert_close(torch.autograd.grad(actual, activations)[0], torch.autograd.grad(expected, activations)[0])
    # The target (control vector or frozen reference) gets no gradient.
    activation_mse(activations, reference, mask).backward()
    assert reference.grad is None and activations.grad is not None


def test_activation_mse_uses_the_answer_positions_themselves(hidden):
    """open-unlearning's mask is labels != -100 unshifted: the first answer token counts, the last prompt one not."""
    labels, activations, reference = hidden
    mask = rmu_answer_mask(labels)
    base = activation_mse(activations, reference, mask).item()
    first_answer = 2  # row 0: prompt positions 0-1, answer 2-6
    bumped = activations.detach().clone()
    bumped[0, first_answer - 1] += 100.0  # the last prompt position: ignored
    assert activation_mse(bumped, reference, mask).item() == pytest.approx(base, abs=1e-6)
    bumped[0, first_answer] += 100.0  # the first answer position: counted
    assert activation_mse(bumped, reference, mask).item() > base + 1.0


def test_activation_mse_is_zero_for_identical_inputs_and_ignores_masked_positions(hidden):
    labels, activations, _ = hidden
    mask = rmu_answer_mask(labels)
    same = activations.detach().clone()
    assert activation_mse(activations, same, mask).item() == 0.0
    # Arbitrary values at prompt and padding positions change nothing.
    noisy = same.clone()
    noisy[~mask] = 1e4
    assert activation_mse(noisy, same, mask).item() == 0.0
    noisy_target = same.clone()
    noisy_target[~mask] = -1e4
    assert activation_mse(activations, noisy_target, mask).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        activation_mse(activations, same, mask[:, :-1])


def test_activation_mse_sequence_without_answer_positions_counts_zero(hidden):
    """open-unlearning divides 0 by 0 there (NaN); here that sequence contributes 0 to the mean over sequences."""
    labels, activations, reference = hidden
    labels = labels.clone()
    labels[2] = IGNORE
    value = activation_mse(activations, reference, rmu_answer_mask(labels))
    assert torch.isfinite(value)
    two_rows = _activation_oracle(activations[:2], reference[:2], labels[:2])
    _assert_close(value, two_rows * 2 / 3)


def test_activation_mse_low_precision_is_scored_in_float32(hidden):
    labels, activations, reference = hidden
    low = activations.detach().to(torch.bfloat16)
    value = activation_mse(low, reference.to(torch.bfloat16), rmu_answer_mask(labels))
    assert value.dtype == torch.float32
    _assert_close(value, _activation_oracle(low.float(), reference.to(torch.bfloat16).float(), labels))


def test_recorded_defaults():
    rmu = OPEN_UNLEARNING_DEFAULTS["rmu"]
    assert set(rmu) == {"module_regex", "trainable_params_regex", "steering_coeff", "alpha", "gamma",
                        "retain_loss_type"}
    assert rmu["module_regex"] == r"model\.layers\.7"
    assert rmu["trainable_params_regex"] == [r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"]
    assert OPEN_UNLEARNING_DEFAULTS["altpo"]["beta"] == OPEN_UNLEARNING_DEFAULTS["dpo"]["beta"]
    assert WMDP_RMU_ZEPHYR["layer_id"] == 7 and WMDP_RMU_ZEPHYR["steering_coeff"] == 6.5
    assert WMDP_RMU_ZEPHYR["alpha"] == 1200.0 and WMDP_RMU_ZEPHYR["update_layer_ids"] == (5, 6, 7)
