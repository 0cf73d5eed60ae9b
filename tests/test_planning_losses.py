"""The memory plan (``simu plan``) of the newer losses: RMU's hidden-state hook, DPO's preferred answers,
and the frozen reference model both read.

As ``tests/test_planning.py``: the plan simulates the trainer's step on fake tensors
(``planning._simulate_step``); here it must plan ``rmu``, ``dpo`` and ``idk_dpo`` at all, count their
frozen reference model (its weights' bytes, none for FO-GradDiff with the NLL retain loss), see that
DPO holds the preferred answers' graph together with the forget one's (more activation memory than
FO-GradDiff or NPO on the same batch), and be within test_planning's 20 % of the peak of a real step
measured on CPU with the same tensor-memory tracker.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from simu_core import planning
from simu_core.config import load_config
from simu_core.memtrack import TensorMemoryTracker
from simu_core.paths import PROJECT_ROOT
from simu_core.prompting import EncodedExample
from simu_core.unlearning import build_trainer, get_method

LLAMA2_7B = PROJECT_ROOT / "data" / "model_shapes" / "llama2-7b"
# tests/test_planning.py's tiny model and sequence length.
TINY = ["model.tiny.num_layers=3", "model.tiny.hidden_size=96", "model.tiny.intermediate_size=384",
        "model.tiny.vocab_size=768", "model.max_length=128", "unlearn.batch_size=6", "model.finetune.batch_size=6"]
SEQ = 80
# The methods' own settings: RMU steers the output of decoder layer 1 of the 3 (its scope: the down
# projections of layers 0 and 1).
METHODS = {
    "rmu": ["unlearn.method=rmu", "unlearn.rmu_layer=1"],
    "dpo": ["unlearn.method=dpo"],
    "idk_dpo": ["unlearn.method=idk_dpo"],
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def examples(count: int, seed: int, vocab: int) -> list[EncodedExample]:
    """Items of exactly SEQ tokens (the plan assumes full-length sequences), answer = second half."""
    return planning.full_length_examples(count, SEQ, vocab, seed)


def unlearn_step(*overrides: str) -> planning.StepMemory:
    config = load_config(overrides=TINY + list(overrides))
    return planning.simulate_step(planning.architecture_config(config), config, "unlearn", seq_len=SEQ)


def model_bytes(config) -> int:
    """What a real fp32 model of the config's shape holds: parameters and buffers."""
    model = LlamaForCausalLM(planning.architecture_config(config))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("method", list(METHODS))
def test_the_plan_counts_the_frozen_reference_model(method):
    config = load_config(overrides=TINY + METHODS[method])
    plan = planning.plan_memory(config, stages=("unlearn",))
    assert plan.method == method
    step = planning.simulate_step(planning.architecture_config(config), config, "unlearn")
    weights = model_bytes(config)
    # fp32: the reference is a second copy of the weights.
    assert step.weights == step.reference == weights > 0
    single = plan.unlearn(1)
    assert single.weights == 2 * weights
    assert "with the frozen reference model" in single.note
    # FSDP shards the reference like the model: half of both per device, plus what FSDP holds unsharded.
    two = plan.unlearn(2)
    assert two.weights == 2 * weights // 2 + step.root_params + 2 * step.layer_params
    assert single.peak > single.weights + single.gradients


def test_fo_graddiff_with_the_nll_retain_loss_plans_no_reference():
    nll = load_config(overrides=TINY + ["unlearn.method=fo_graddiff", "unlearn.retain_loss=nll"])
    row = planning.plan_memory(nll, stages=("unlearn",)).unlearn(1)
    step = planning.simulate_step(planning.architecture_config(nll), nll, "unlearn")
    assert step.reference == 0 and row.weights == step.weights == model_bytes(nll)
    assert "reference" not in row.note


def test_rmu_plans_its_published_scope_and_dpo_every_parameter():
    rmu = unlearn_step(*METHODS["rmu"])
    assert rmu.trainable == 2 * 384 * 96  # the down projections of layers 0 and 1 (rmu_layer=1)
    assert rmu.gradients == 4 * rmu.trainable and rmu.optimizer == pytest.approx(8 * rmu.trainable, abs=64)
    dpo = unlearn_step(*METHODS["dpo"])
    config = load_config(overrides=TINY)
    assert dpo.trainable == sum(p.numel() for p in LlamaForCausalLM(planning.architecture_config(config)).parameters())


def test_dpo_holds_the_preferred_answers_graph_with_the_forget_one():
    """DPO's forget term reads the forget answers' and the preferred answers' logits (and the reference's
    of both) at once: its activations are about twice those of one batch's graph (FO-GradDiff; NPO, which
    also reads reference logits), and its peak exceeds theirs on the same model and batch."""
    fo = unlearn_step("unlearn.method=fo_graddiff")
    npo = unlearn_step("unlearn.method=npo")
    dpo = unlearn_step(*METHODS["dpo"])
    idk = unlearn_step(*METHODS["idk_dpo"])
    assert dpo.activations > 1.5 * fo.activations and dpo.activations > 1.5 * npo.activations
    assert dpo.fwd_bwd_peak > npo.fwd_bwd_peak > fo.fwd_bwd_peak
    assert dpo.peak > npo.peak > fo.peak
    # idk_dpo is DPO toward "I don't know": the same memory.
    assert idk == dpo


def measured_unlearning_peak(config) -> int:
    """tests/test_planning.py's measurement (a real 3-step run under the tracker, reference included),
    with the preference losses' preferred answers (full length too)."""
    shape = planning.architecture_config(config)
    spec = get_method(config.unlearn.method)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(getattr(torch, config.model.dtype))
    mask = planning.mask_for_plan([shape.intermediate_size] * shape.num_hidden_layers, 0.05) \
        if spec.needs_mask else None
    preferred = examples(12, 3, shape.vocab_size) if spec.loss in ("dpo", "idk_dpo", "altpo") else None
    trainer = build_trainer(
        model, examples(12, 1, shape.vocab_size), examples(12, 2, shape.vocab_size),
        config.unlearn.model_copy(update={"max_steps": 3}), pad_token_id=0, mask=mask, progress=False,
        autocast_dtype=torch.bfloat16 if config.run.dtype == "bfloat16" else None, preferred_examples=preferred,
    )
    assert trainer.reference is not None
    tracker = TensorMemoryTracker()
    tracker.register([*model.parameters(), *model.buffers()])
    tracker.register([*trainer.reference.parameters(), *trainer.reference.buffers()])
    with tracker:
        trainer.train()
    return tracker.peak


@pytest.mark.parametrize("overrides", [
    METHODS["dpo"],
    METHODS["rmu"],
    ["unlearn.method=simu_dpo"],
    ["unlearn.method=simu_rmu", "unlearn.rmu_layer=2"],
    [*METHODS["dpo"], "model.dtype=bfloat16", "unlearn.gradient_checkpointing=true"],
], ids=["dpo", "rmu", "simu_dpo", "simu_rmu", "dpo-bf16-ckpt"])
def test_unlearning_estimate_is_within_20_percent_of_the_measured_peak(overrides):
    config = load_config(overrides=TINY + overrides)
    estimate = planning.simulate_step(planning.architecture_config(config), config, "unlearn", seq_len=SEQ)
    measured = measured_unlearning_peak(config)
    assert estimate.peak == pytest.approx(measured, rel=0.20)


# ----------------------------------------------------------------------------------------------
# Planner defects found with the new losses, each failing before its fix: the clip over tensors
# without a gradient, RMU's layer set on a deep model's shallow stand-ins, and the KL retain loss
# under fake tensors.


@pytest.mark.parametrize("method", ["simu_rmu", "rmu_all"])
def test_rmu_with_trainable_layers_above_rmu_layer_can_be_planned(method):
    config = load_config(overrides=TINY + [f"unlearn.method={method}", "unlearn.rmu_layer=1"])
    estimate = planning.simulate_step(planning.architecture_config(config), config, "unlearn", seq_len=SEQ)
    assert estimate.peak == pytest.approx(measured_unlearning_peak(config), rel=0.20)


def test_rmu_on_a_deep_model_can_be_planned():
    config = load_config(overrides=[f"model.base={LLAMA2_7B}", "unlearn.method=rmu"])  # rmu_layer 7 of 32
    plan = planning.plan_memory(config, stages=("unlearn",))
    assert plan.trainable == 3 * 11008 * 4096  # the down projections of layers 5, 6, 7


@pytest.mark.parametrize("method", ["fo_graddiff", "dpo"])
def test_the_kl_retain_loss_can_be_planned_and_counts_the_reference(method):
    step = unlearn_step(f"unlearn.method={method}", "unlearn.retain_loss=kl")
    assert step.reference == step.weights > 0


@pytest.mark.parametrize("method", ["wga", "undial", "ceu", "satimp"])
def test_token_weighted_losses_can_be_planned(method):
    # Their answer-position means are masked sums (no data-dependent branch), so fake tensors run them.
    step = unlearn_step(f"unlearn.method={method}")
    assert step.peak > 0 and (step.reference > 0) == (method == "undial")
