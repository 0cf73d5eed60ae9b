"""One model over several processes (issue 12): FSDP2 unlearning and fine-tuning with gloo on CPU.

``stages.unlearn`` with ``run.devices=2`` launches torchrun with two gloo processes, each holding
half of every parameter. The unlearned weights must equal a one-process run's within fp32
rounding, and every frozen entry must be bit-identical to the target. ``stages.train_model`` with
``run.devices=2`` likewise fine-tunes the same weights as one process.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from simu_core import stages
from simu_core.config import load_config
from simu_core.masking import NeuronMask
from simu_core.models.tiny import build_tiny_llama, save_model

OVERRIDES = [
    "unlearn.stop_at=null",  # a fixed budget (the default config stops at the reference's level)
    "data.num_authors=12", "data.holdout_authors=2", "data.general_facts=8",
    "model.tiny.num_layers=2", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_heads=4", "model.tiny.vocab_size=300", "model.max_length=64",
    "unlearn.method=simu", "unlearn.max_steps=3", "unlearn.batch_size=3", "unlearn.grad_accum=2",
    "unlearn.lr=1e-3",
]
CRITICAL = ((3, 17, 40), (0, 63))


def write_inputs(root, overrides=OVERRIDES, critical=CRITICAL):
    """Prepared data, an (untrained) tiny target and a SIMU mask under ``root``, as the stages write them."""
    config = load_config(overrides=overrides)
    stages.prepare_data(config, root / "data")
    tokenizer = stages.load_tokenizer(root / "data" / stages.TOKENIZER_DIR)
    model = build_tiny_llama(config.model.tiny, tokenizer, config.model.max_length, seed=0)
    save_model(model, tokenizer, root / "target" / stages.MODEL_DIR)
    (root / "mask").mkdir()
    NeuronMask(neurons=critical, num_neurons=(64, 64)).save(root / "mask" / "mask.parquet")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("fsdp"))


def unlearn(inputs, devices: int, out_name: str, *overrides: str):
    config = load_config(overrides=OVERRIDES + [f"run.devices={devices}", *overrides])
    out = inputs / out_name
    summary = stages.unlearn(config, inputs / "data", inputs / "target", inputs / "mask", out, progress=False)
    return summary, load_file(str(out / stages.MODEL_DIR / "model.safetensors"))


def test_two_gloo_processes_unlearn_as_one_and_freeze_exactly(inputs):
    # 10 forget items in micro-batches of 3: 3, 3, 3, 1; the 1-item micro-batch (step 2) leaves
    # process 1 an empty chunk, which runs with weight 0.
    single_stats, single = unlearn(inputs, 1, "one")
    sharded_stats, sharded = unlearn(inputs, 2, "two")
    target = load_file(str(inputs / "target" / stages.MODEL_DIR / "model.safetensors"))
    assert sharded_stats["devices"] == 2 and single_stats["devices"] == 1
    assert set(sharded) == set(single) == set(target)
    moved = 0
    for name, weights in single.items():
        torch.testing.assert_close(sharded[name], weights, rtol=1e-5, atol=1e-6, msg=name)
        trainable = torch.zeros_like(weights, dtype=torch.bool)
        if "self_attn" in name:
            trainable[:] = True
        elif "down_proj" in name:
            trainable[:, list(CRITICAL[int(name.split(".")[2])])] = True
        # Frozen entries: bit for bit the target's, in both runs.
        assert torch.equal(sharded[name][~trainable], target[name][~trainable]), name
        assert torch.equal(weights[~trainable], target[name][~trainable]), name
        moved += int((sharded[name][trainable] != target[name][trainable]).sum())
    assert moved > 0
    # Compact state only for trainable entries: the same total bytes as one process.
    assert sharded_stats["optimizer_state_bytes"] == single_stats["optimizer_state_bytes"]
    assert sharded_stats["trainable_coordinates"] == single_stats["trainable_coordinates"]
    for key in ("forget_loss_first", "forget_loss_last", "retain_loss_last"):
        assert sharded_stats[key] == pytest.approx(single_stats[key], rel=1e-5), key
    log = json.loads((inputs / "two" / "stats.json").read_text())
    assert log["steps"] == 3


def test_npo_with_a_sharded_reference_and_adamw_on_shards_matches_one_process(inputs):
    # NPO: AdamW on every parameter, a frozen reference model sharded too, a sequence-level loss
    # (each process's share counts sequences, not tokens); micro-batches of 5 items split 3 + 2.
    _, single = unlearn(inputs, 1, "npo-one", "unlearn.method=npo", "unlearn.batch_size=5")
    _, sharded = unlearn(inputs, 2, "npo-two", "unlearn.method=npo", "unlearn.batch_size=5")
    for name, weights in single.items():
        torch.testing.assert_close(sharded[name], weights, rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_stop_where_one_process_stops(inputs):
    """unlearn.stop_at sharded: every process measures, all stop at the same check, as one process does."""
    import pandas as pd

    budget = ["unlearn.max_steps=8", "unlearn.eval_every=1", "unlearn.method=fo_graddiff", "unlearn.lr=3e-3"]
    unlearn(inputs, 1, "probe", *budget, "unlearn.stop_at=forget_prob<=1e-30")
    probe = pd.read_parquet(inputs / "probe" / "trajectory.parquet")
    values = probe["forget_prob"].to_numpy()
    assert (values[1:] < values[:-1]).all()  # forget probability falls every step here
    level = float((values[4] * values[5]) ** 0.5)  # first reached at step 5, far from rounding either side
    stop = [*budget, f"unlearn.stop_at=forget_prob<={level!r}"]
    single_stats, single = unlearn(inputs, 1, "stop-one", *stop)
    sharded_stats, sharded = unlearn(inputs, 2, "stop-two", *stop)
    assert single_stats["stop_step"] == sharded_stats["stop_step"] == sharded_stats["steps"] == 5
    assert sharded_stats["stop_value"] == pytest.approx(single_stats["stop_value"], rel=1e-5)
    trajectory = pd.read_parquet(inputs / "stop-two" / "trajectory.parquet")
    assert trajectory["step"].tolist() == list(range(6))
    for name, weights in single.items():
        torch.testing.assert_close(sharded[name], weights, rtol=1e-5, atol=1e-6, msg=name)


def test_more_devices_than_exist_is_refused_before_any_work(inputs):
    config = load_config(overrides=OVERRIDES + ["run.devices=4096"])
    with pytest.raises(ValueError, match=r"run\.devices=4096 but this machine has \d+ CPU core"):
        stages.unlearn(config, inputs / "data", inputs / "target", inputs / "mask", inputs / "never")
    assert not (inputs / "never").exists()


def test_a_mask_of_another_model_is_refused_before_loading(inputs, tmp_path):
    NeuronMask(neurons=((1,),) * 3, num_neurons=(128,) * 3).save(tmp_path / "mask.parquet")
    config = load_config(overrides=OVERRIDES)
    with pytest.raises(ValueError, match=r"mask has 3 layers with neuron counts \[128, 128, 128\], the model has "
                                         r"2 layers with \[64, 64\]"):
        stages.unlearn(config, inputs / "data", inputs / "target", tmp_path, tmp_path / "out")


def test_a_failing_process_fails_the_stage_with_its_error(inputs):
    config = load_config(overrides=OVERRIDES + ["run.devices=2", "run.fail_at_unlearn_step=2"])
    with pytest.raises(RuntimeError, match=r"unlearning over 2 processes failed .*process \d: RuntimeError: "
                                           r"unlearn simu: injected fault"):
        stages.unlearn(config, inputs / "data", inputs / "target", inputs / "mask", inputs / "failed", progress=False)
    assert not (inputs / "failed" / stages.MODEL_DIR).exists()


def test_periodic_checkpoints_are_refused_for_sharded_runs():
    from simu_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"unlearn\.checkpoint_every=5 with run\.devices=2"):
        load_config(overrides=["run.devices=2", "unlearn.checkpoint_every=5"])


# ----------------------------------------------------------------------------------------------
# Fine-tuning (train_target / train_retain_reference) under torchrun

# 136 target items in micro-batches of 9: 15 full ones and one of 1 item, where process 1 runs an
# item with weight 0; 2 micro-batches a step: 8 AdamW steps with warm-up, weight decay, clipping.
TRAIN = ["model.finetune.epochs=1", "model.finetune.batch_size=9", "model.finetune.grad_accum=2",
         "model.finetune.weight_decay=0.01", "model.finetune.max_grad_norm=0.5"]


def train(inputs, devices: int, out_name: str, *overrides: str):
    config = load_config(overrides=OVERRIDES + TRAIN + [f"run.devices={devices}", *overrides])
    out = inputs / out_name
    stats = stages.train_model(config, inputs / "data", out, "target", progress=False)
    return stats, load_file(str(out / stages.MODEL_DIR / "model.safetensors")), pd.read_parquet(out / "train_log.parquet")


def test_two_gloo_processes_fine_tune_as_one(inputs):
    # Gradient checkpointing changes no result (bit for bit on CPU): on here, it checks that it composes with FSDP.
    single_stats, single, single_log = train(inputs, 1, "train-one")
    sharded_stats, sharded, sharded_log = train(inputs, 2, "train-two", "model.finetune.gradient_checkpointing=true")
    assert (single_stats["devices"], sharded_stats["devices"]) == (1, 2)
    assert sharded_stats["steps"] == single_stats["steps"] == 8
    assert sharded_stats["examples"] == single_stats["examples"] == 136
    assert set(sharded) == set(single)
    # Within fp32 rounding (measured: at most 2.3e-7 on weights of magnitude <= 1, moved by up to 1.4e-2):
    # the sums run in another order (chunks of 5 + 4 items summed by gloo, the clipping norm in
    # float64), and AdamW's normalised update m / sqrt(v) carries a gradient's relative rounding
    # error into the step, times lr = 3e-3, over 8 steps; the tolerance is the unlearning tests'.
    for name, weights in single.items():
        torch.testing.assert_close(sharded[name], weights, rtol=1e-5, atol=1e-6, msg=name)
    for column in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(sharded_log[column], single_log[column], rtol=1e-5, err_msg=column)
    assert (single_log["grad_norm"] > 0.5).any()  # clipping took part


def test_fine_tuning_refuses_bad_input_before_any_work(inputs):
    config = load_config(overrides=OVERRIDES + ["run.devices=4096"])
    with pytest.raises(ValueError, match=r"run\.devices=4096 but this machine has \d+ CPU core"):
        stages.train_model(config, inputs / "data", inputs / "never-trained", "target")
    with pytest.raises(ValueError, match=r"which must be 'target' or 'reference', got 'forget'"):
        stages.train_model(config, inputs / "data", inputs / "never-trained", "forget")
    assert not (inputs / "never-trained").exists()
