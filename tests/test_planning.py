"""The memory plan (issue 12): estimates from config.json, checked against measured peaks.

The plan simulates each stage's step on fake tensors. Here the same steps run for real on tiny
models on CPU under the same tensor-memory tracker (live tensor storage bytes: the CPU counterpart
of ``torch.cuda.max_memory_allocated``), and the estimate must be within 20 % of the measured peak.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from simu_core import planning
from simu_core.config import load_config
from simu_core.finetune import finetune
from simu_core.masking import NeuronMask
from simu_core.memtrack import TensorMemoryTracker
from simu_core.paths import PROJECT_ROOT
from simu_core.prompting import EncodedExample
from simu_core.unlearning import build_trainer

LLAMA2_7B = PROJECT_ROOT / "data" / "model_shapes" / "llama2-7b"
TINY = ["model.tiny.num_layers=3", "model.tiny.hidden_size=96", "model.tiny.intermediate_size=384",
        "model.tiny.vocab_size=768", "model.max_length=128", "unlearn.batch_size=6", "model.finetune.batch_size=6"]
SEQ = 80


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def examples(count: int, seed: int, vocab: int) -> list[EncodedExample]:
    """Items of exactly SEQ tokens (the plan assumes full-length sequences), answer = second half."""
    return planning.full_length_examples(count, SEQ, vocab, seed)


def measured_unlearning_peak(config) -> int:
    shape = planning.architecture_config(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(getattr(torch, config.model.dtype))
    mask = planning.mask_for_plan([shape.intermediate_size] * shape.num_hidden_layers, 0.05) \
        if config.unlearn.method == "simu" else None
    trainer = build_trainer(
        model, examples(12, 1, shape.vocab_size), examples(12, 2, shape.vocab_size),
        config.unlearn.model_copy(update={"max_steps": 3}), pad_token_id=0, mask=mask, progress=False,
        autocast_dtype=torch.bfloat16 if config.run.dtype == "bfloat16" else None,
    )
    tracker = TensorMemoryTracker()
    tracker.register([*model.parameters(), *model.buffers()])
    if trainer.reference is not None:
        tracker.register([*trainer.reference.parameters(), *trainer.reference.buffers()])
    with tracker:
        trainer.train()
    return tracker.peak


@pytest.mark.parametrize("overrides", [
    ["unlearn.method=simu"],
    ["unlearn.method=so_graddiff"],
    ["unlearn.method=fo_graddiff"],
    ["unlearn.method=npo"],
    ["unlearn.method=simu", "model.dtype=bfloat16", "unlearn.gradient_checkpointing=true"],
    ["unlearn.method=so_graddiff", "run.dtype=bfloat16", "unlearn.gradient_checkpointing=true"],
], ids=["simu", "so_graddiff", "fo_graddiff", "npo", "simu-bf16-ckpt", "so-autocast-ckpt"])
def test_unlearning_estimate_is_within_20_percent_of_the_measured_peak(overrides):
    config = load_config(overrides=TINY + overrides)
    estimate = planning.simulate_step(planning.architecture_config(config), config, "unlearn", seq_len=SEQ)
    measured = measured_unlearning_peak(config)
    assert estimate.peak == pytest.approx(measured, rel=0.20)



class _PadTokenizer:
    """All that fine-tuning and the attack read of a tokenizer."""

    pad_token_id = 0


def _tracked_model(shape):
    """A seeded Llama of ``shape`` and a memory tracker holding its parameters and buffers."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape)
    tracker = TensorMemoryTracker()
    tracker.register([*model.parameters(), *model.buffers()])
    return model, tracker

def test_finetuning_estimate_is_within_20_percent_of_the_measured_peak():
    config = load_config(overrides=TINY)
    shape = planning.architecture_config(config)
    estimate = planning.simulate_step(shape, config, "finetune", seq_len=SEQ)

    model, tracker = _tracked_model(shape)
    with tracker:
        finetune(model, _PadTokenizer(), examples(12, 3, shape.vocab_size),
                 config.model.finetune.model_copy(update={"epochs": 1}), progress=False)
    assert estimate.peak == pytest.approx(tracker.peak, rel=0.20)


def test_relearning_estimate_is_within_20_percent_of_the_measured_peak(monkeypatch):
    """The attack's step (MasterAdamW over every parameter, relearn.batch_size items) as
    simu_core.attacks.relearn.relearn_curve runs it, on full-length items; its measurements are stubbed out here
    (the plan adds the evaluation's pass on top of the attack's persistent state)."""
    import pandas as pd

    from simu_core.attacks import relearn as relearning

    config = load_config(overrides=TINY + ["relearn.enabled=true", "relearn.batch_size=5", "relearn.steps=3"])
    shape = planning.architecture_config(config)
    estimate = planning.simulate_step(shape, config, "relearn", seq_len=SEQ)
    full_length = iter(examples(8, 4, shape.vocab_size))
    monkeypatch.setattr(relearning, "encode_qa", lambda *args: next(full_length))
    monkeypatch.setattr(relearning, "forget_measures", lambda *args: dict.fromkeys(relearning.MEASURES, 0.0))

    model, tracker = _tracked_model(shape)
    items = pd.DataFrame({"question": ["q"] * 8, "answer": ["a"] * 8})
    with tracker:
        relearning.relearn_curve(model, _PadTokenizer(), items, items, config.relearn, config.eval,
                                 lr=config.relearn.lr, max_length=SEQ, seed=0, progress=False)
    assert estimate.peak == pytest.approx(tracker.peak, rel=0.20)
    # AdamW's two fp32 moments over every parameter, as fine-tuning's.
    assert estimate.trainable == sum(p.numel() for p in model.parameters())
    assert estimate.optimizer == pytest.approx(2 * 4 * estimate.trainable, rel=1e-3)


def test_the_plan_has_a_relearning_row_only_when_the_attack_runs():
    config = load_config(overrides=TINY + ["relearn.batch_size=3"])
    assert not planning.plan_memory(config).rows("relearn")
    plan = planning.plan_memory(load_config(overrides=TINY + ["relearn.batch_size=3", "relearn.enabled=true"]))
    (row,) = plan.rows("relearn")
    assert row.devices == 1 and row.batch == 3 and row.seq_len == 128
    step = planning.simulate_step(planning.architecture_config(config), config, "relearn")
    evaluate = plan.rows("evaluate")[0]
    # Measured between steps with the optimizer state alive: the larger of the step and the evaluation on top.
    assert row.optimizer == step.optimizer > 0 and row.peak == max(
        step.peak, step.weights + step.master + step.optimizer + evaluate.activations)
    assert "relearn" in planning.format_plan(plan)


def test_the_plan_has_an_attack_row_sized_by_its_largest_attack():
    base = TINY + ["attack.quantize.group_size=32"]
    assert not planning.plan_memory(load_config(overrides=base)).rows("attack")
    plan = planning.plan_memory(load_config(overrides=base + ["attacks=[quantize]"]))
    (row,) = plan.rows("attack")
    evaluate = plan.rows("evaluate")[0]
    # The model and its quantized copy, then the evaluation's larger of scoring pass and generation cache.
    assert row.devices == 1 and row.peak == 2 * evaluate.weights + evaluate.activations
    longer = planning.plan_memory(load_config(overrides=base + ["attacks=[quantize, in_context]",
                                                                "attack.in_context.k=8"])).rows("attack")[0]
    assert longer.peak > row.peak and "largest is in_context" in longer.note
    assert "attack" in planning.format_plan(plan)


def test_deep_models_are_extrapolated_from_two_and_three_layers(monkeypatch):
    config = load_config(overrides=TINY + ["model.tiny.num_layers=7", "unlearn.method=so_graddiff"])
    shape = planning.architecture_config(config)
    extrapolated = planning.simulate_step(shape, config, "unlearn", seq_len=SEQ)
    monkeypatch.setattr(planning, "EXACT_LAYERS", 100)
    whole = planning.simulate_step(shape, config, "unlearn", seq_len=SEQ)
    for name in ("weights", "optimizer", "gradients", "activations", "fwd_bwd_peak", "optimizer_peak", "trainable"):
        assert getattr(extrapolated, name) == pytest.approx(getattr(whole, name), rel=0.01), name


def test_plan_of_llama2_7b_so_graddiff_needs_fsdp(capsys, tmp_path):
    from flows.cli import main

    out = tmp_path / "plan.json"
    code = main(["plan", "--set", f"model.base={LLAMA2_7B}", "--set", "unlearn.method=so_graddiff",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "6.74 B parameters" in printed
    assert "does NOT fit one 80 GiB device" in printed
    assert "unlearning with FSDP on 4 devices" in printed
    plan = json.loads(out.read_text())
    rows = {row["devices"]: row for row in plan["stages"] if row["stage"] == "unlearn"}
    assert not rows[1]["fits"] and rows[4]["fits"]
    # fp32 weights, Sophia's m and h, fp32 gradients: 16 bytes per parameter on one device, a quarter on 4.
    parameters = plan["parameters"]
    assert rows[1]["weights"] + rows[1]["optimizer"] + rows[1]["gradients"] == pytest.approx(16 * parameters, rel=0.01)
    assert rows[4]["optimizer"] == pytest.approx(8 * parameters / 4, rel=0.01)
    assert rows[4]["peak"] < 0.9 * 80 * 2**30 < rows[1]["peak"]
    # Fine-tuning from model.base is sharded too: AdamW's two fp32 moments split over the devices.
    train = {row["devices"]: row for row in plan["stages"] if row["stage"] == "train"}
    assert sorted(train) == [1, 2, 4, 8]
    assert train[1]["optimizer"] == pytest.approx(8 * parameters, rel=0.01)
    assert train[4]["optimizer"] == pytest.approx(8 * parameters / 4, rel=0.01)
    assert train[4]["batch"] == 4 and train[4]["peak"] < train[1]["peak"] / 2


def test_simu_plan_counts_only_the_masks_columns_and_attention():
    config = load_config(overrides=[f"model.base={LLAMA2_7B}", "unlearn.method=simu", "model.dtype=bfloat16"])
    plan = planning.plan_memory(config, stages=("unlearn",), mask_fraction=0.05)
    single = plan.unlearn(1)
    attention = 32 * 4 * 4096 * 4096
    columns = 32 * round(0.05 * 11008) * 4096
    assert plan.trainable == attention + columns
    assert single.optimizer == 8 * plan.trainable and single.master == 4 * plan.trainable


def test_a_mask_of_another_model_shape_is_refused_naming_both(tmp_path, capsys):
    from flows.cli import main

    mask = NeuronMask(neurons=((0, 1),) * 2, num_neurons=(64, 64))
    mask.save(tmp_path / "mask.parquet")
    code = main(["plan", "--set", f"model.base={LLAMA2_7B}", "--mask", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2
    assert "mask has 2 layers with neuron counts [64, 64]" in error and "the model has 32 layers with [11008" in error


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    config = load_config(overrides=[f"model.base={tmp_path}"])
    with pytest.raises(planning.PlanError, match=r"model\.base: cannot read the model's config.json"):
        planning.plan_memory(config)


@pytest.fixture()
def gpu_of(monkeypatch):
    """Pretend this machine has GPUs of the given memory (GiB): the preflight checks only read that."""
    def set_memory(gib: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
        monkeypatch.setattr(planning, "run_device_memory", lambda config: (gib * 2**30, "test GPU"))
    return set_memory


@pytest.mark.parametrize("models, stage, gib", [
    # From model.base: fine-tuning (fp32, batch 16) is checked first.
    ([f"model.base={LLAMA2_7B}"], "fine-tuning", 55),
    # A given target and reference: nothing is fine-tuned; unlearning is checked.
    ([f"model.target={LLAMA2_7B}", f"model.retain_reference={LLAMA2_7B}"], "unlearning", 57),
], ids=["fine-tuning", "unlearning"])
def test_a_model_that_does_not_fit_the_devices_is_refused_naming_the_numbers(gpu_of, models, stage, gib):
    from simu_core.preflight import PreflightError, check_inputs

    gpu_of(40)
    run = ["unlearn.method=so_graddiff", "run.device=cuda"]
    with pytest.raises(PreflightError, match=rf"^{stage} LlamaForCausalLM .* needs {gib}\.\d GiB per device on "
                                             r"run\.devices=2, and a device here has 40\.0 GiB .*it fits from run\.devices=4"):
        check_inputs(load_config(overrides=[*models, *run, "run.devices=2"]))
    check_inputs(load_config(overrides=[*models, *run, "run.devices=4"]))


def test_a_relearning_attack_that_does_not_fit_one_device_is_refused(gpu_of):
    from simu_core.preflight import PreflightError, check_inputs

    gpu_of(70)  # SIMU's unlearning fits (59.7 GiB); the attack's AdamW on every fp32 parameter does not
    models = [f"model.target={LLAMA2_7B}", f"model.retain_reference={LLAMA2_7B}", "unlearn.method=simu",
              "run.device=cuda"]
    check_inputs(load_config(overrides=models))
    with pytest.raises(PreflightError, match=r"^the relearning attack LlamaForCausalLM .* needs 101\.\d GiB on its one "
                                             r"device, and a device here has 70\.0 GiB .*not sharded"):
        check_inputs(load_config(overrides=[*models, "relearn.enabled=true"]))


def test_a_model_that_does_not_fit_even_sharded_says_so(gpu_of):
    from simu_core.preflight import PreflightError, check_inputs

    gpu_of(0.5)
    config = load_config(overrides=[f"model.base={LLAMA2_7B}", "unlearn.method=so_graddiff", "run.device=cuda",
                                    "run.devices=8"])
    with pytest.raises(PreflightError, match=r"on run\.devices=8, and a device here has 0\.5 GiB .*fits none of "
                                             r"1-64 devices"):
        check_inputs(config)


def test_more_devices_than_exist_is_a_preflight_error():
    from simu_core.preflight import PreflightError, check_inputs

    with pytest.raises(PreflightError, match=r"run\.devices=4096 but this machine has \d+ CPU core"):
        check_inputs(load_config(overrides=["run.devices=4096"]))


def test_a_stopped_unlearning_plans_its_checks_scoring_pass():
    """unlearn.stop_at: the unlearning row's peak covers the checks' scoring pass (eval.batch_size items)
    on top of the weights and optimizer state; without a stop level, the step alone."""
    fixed = load_config(overrides=TINY + ["unlearn.stop_at=null", "eval.batch_size=512"])
    stopped = load_config(overrides=TINY + ["unlearn.stop_at=forget_prob<=reference", "eval.batch_size=512"])
    rows = {name: planning.plan_memory(config, stages=("unlearn", "evaluate")).rows("unlearn")[0]
            for name, config in (("fixed", fixed), ("stopped", stopped))}
    evaluate = planning.plan_memory(stopped, stages=("evaluate",)).rows("evaluate")[0]
    assert rows["stopped"].peak > rows["fixed"].peak  # 512 items scored at once outweigh a step of 6
    expected = rows["fixed"].weights + rows["fixed"].master + rows["fixed"].optimizer + evaluate.activations
    assert rows["stopped"].peak == max(rows["fixed"].peak, expected)
    assert "stop checks" in rows["stopped"].note


def test_a_refined_stop_plans_its_copies_of_the_trainable_tensors():
    """unlearn.stop_refine: one fp32 copy of every tensor with a trainable entry across a checked step,
    two while the step is bisected (here the checks' 512-item scoring pass is the peak: two copies on it)."""
    base = TINY + ["unlearn.method=so_graddiff", "unlearn.stop_at=forget_prob<=reference", "eval.batch_size=512"]
    plain = planning.plan_memory(load_config(overrides=base), stages=("unlearn", "evaluate")).rows("unlearn")[0]
    config = load_config(overrides=base + ["unlearn.stop_refine=6"])
    refined = planning.plan_memory(config, stages=("unlearn", "evaluate")).rows("unlearn")[0]
    # Every parameter is trainable here: the copies are the model's parameters, in fp32, counted independently.
    parameters = sum(p.numel() for p in LlamaForCausalLM(planning.architecture_config(config)).parameters())
    assert refined.peak - plain.peak == 2 * 4 * parameters
    assert "fp32 copy of the trainable tensors" in refined.note and "copy" not in plain.note
