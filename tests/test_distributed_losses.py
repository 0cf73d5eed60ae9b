"""The newer losses over several processes: RMU and DPO under FSDP2 with gloo on CPU equal one process.

As ``tests/test_distributed.py`` checks SIMU / NPO: ``stages.unlearn`` with ``run.devices=2`` launches
torchrun with two gloo processes, each holding half of every parameter and half of each micro-batch's
items. The unlearned weights and the logged losses must equal a one-process run's within fp32
rounding (the same tolerance as there; with AdamW, a few entries whose gradient nearly cancels may
differ by up to 1 % of one step: see :func:`assert_same_weights`), and every frozen entry must be
bit-identical to the target.

What the two losses add to a sharded run:

- **RMU** reads the output of decoder layer ``unlearn.rmu_layer`` through a forward hook on a
  sharded (FSDP) layer, for the model and, in its retain term, for the sharded frozen reference; both
  terms average over sequences (``objective.forget_units``). ``rmu`` trains only the MLP down
  projections of layers ``rmu_layer-2..rmu_layer`` (AdamW); ``simu_rmu`` trains SIMU's scope (Sophia)
  with ``rmu_layer=0``, so the attention of layer 1 is trainable but out of the loss's reach (no
  gradient): it must stay exactly the target's in both runs.
- **DPO** runs a second pair of forward passes (the preferred answers, model and reference) whose
  graph is alive with the forget one's; each process's share counts its sequences.

Micro-batches: 10 forget items in micro-batches of 3 (3, 3, 3, 1): a 3-item micro-batch splits 2 + 1,
and the 1-item one (step 2) leaves process 1 an empty chunk, which runs with weight 0.
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
from test_distributed import write_inputs

LR = 1e-3
# tests/test_distributed.py's model, data and budget.
OVERRIDES = [
    "unlearn.stop_at=null",  # a fixed budget (the default config stops at the reference's level)
    "data.num_authors=12", "data.holdout_authors=2", "data.general_facts=8",
    "model.tiny.num_layers=2", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_heads=4", "model.tiny.vocab_size=300", "model.max_length=64",
    "unlearn.max_steps=3", "unlearn.batch_size=3", "unlearn.grad_accum=2", f"unlearn.lr={LR}",
]
CRITICAL = ((3, 17, 40), (0, 63))
# The log's figures, compared like the fine-tuning log of tests/test_distributed.py.
LOG_COLUMNS = ("forget_loss", "retain_loss", "forget_term", "retain_term", "objective", "grad_norm", "lr")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prepared data, an (untrained) tiny target, a SIMU mask and DPO's preferred answers, as the stages read them."""
    root = write_inputs(tmp_path_factory.mktemp("fsdp-losses"), OVERRIDES, CRITICAL)
    # DPO's preferred answer of each forget question: another forget item's answer (words the tiny
    # tokenizer knows, lengths that differ from the rejected answer's).
    forget = stages.read_benchmark(root / "data")["forget"]
    answers = list(forget["answer"])
    with open(root / "preferred.jsonl", "w") as handle:
        for question, answer in zip(forget["question"], answers[1:] + answers[:1]):
            handle.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return root


def unlearn(inputs, devices: int, out_name: str, *overrides: str):
    config = load_config(overrides=OVERRIDES + [f"run.devices={devices}",
                                                f"unlearn.preferred_source={inputs / 'preferred.jsonl'}", *overrides])
    out = inputs / out_name
    summary = stages.unlearn(config, inputs / "data", inputs / "target", inputs / "mask", out, progress=False)
    return (summary, load_file(str(out / stages.MODEL_DIR / "model.safetensors")),
            pd.read_parquet(out / "train_log.parquet"))


def _trainable_rmu_layers(name: str, weights: torch.Tensor) -> torch.Tensor:
    """rmu with rmu_layer=1: the down projections of layers 0 and 1 (max(0, 1-2)..1), nothing else."""
    return torch.full_like(weights, "down_proj" in name, dtype=torch.bool)


def _trainable_simu(name: str, weights: torch.Tensor) -> torch.Tensor:
    """SIMU's scope: every attention projection, the critical columns of the down projections."""
    trainable = torch.zeros_like(weights, dtype=torch.bool)
    if "self_attn" in name:
        trainable[:] = True
    elif "down_proj" in name:
        trainable[:, list(CRITICAL[int(name.split(".")[2])])] = True
    return trainable


def _trainable_all(name: str, weights: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(weights, dtype=torch.bool)


# The trainable tensors of the AdamW methods (each with its step counter).
STATE_TENSORS = {
    "rmu": [f"model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1)],
    "dpo": ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{layer}.{part}.weight" for layer in (0, 1) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")],
}

CASES = {
    "rmu": (["unlearn.method=rmu", "unlearn.rmu_layer=1"], _trainable_rmu_layers),
    "simu_rmu": (["unlearn.method=simu_rmu", "unlearn.rmu_layer=0"], _trainable_simu),
    "dpo": (["unlearn.method=dpo"], _trainable_all),
    "simu_dpo": (["unlearn.method=simu_dpo"], _trainable_simu),
    # CE-U leaves out each answer's first token: a process's share counts the tokens the loss averages.
    "so_ceu": (["unlearn.method=so_ceu"], _trainable_all),
}


def assert_same_weights(single: dict, sharded: dict, adamw: bool) -> None:
    """Every entry within tests/test_distributed.py's tolerance (rtol 1e-5, atol 1e-6); with AdamW, up
    to 4 entries of the model may instead be within 1 % of one step (lr) of the one-process value.

    Why AdamW gets that allowance: its step ``lr * m / (sqrt(v) + eps)`` is ``lr * g / (|g| + eps)`` on
    the first step, whose derivative in g is ``lr * eps / (|g| + eps)^2``, up to lr / eps = 1e5 near
    g = 0. A coordinate whose gradient nearly cancels (measured for dpo: lm_head[20, 24] gets -2.2e-8 at
    step 1, against a median |g| of 3e-4) turns the fp32 rounding of that sum (summed in another order
    over two processes) into a step that differs by ~1e-3 of lr (measured: 1.4e-6 after 3 steps, the
    rest of the model within 5e-7). A wrong share or gradient would move whole tensors, not a few entries.
    """
    outliers = []
    for name, weights in single.items():
        if not adamw:
            torch.testing.assert_close(sharded[name], weights, rtol=1e-5, atol=1e-6, msg=name)
            continue
        difference = (sharded[name] - weights).abs()
        far = difference > 1e-6 + 1e-5 * weights.abs()
        outliers += [(name, float(value)) for value in difference[far]]
    assert len(outliers) <= 4 and all(value <= 0.01 * LR for _, value in outliers), outliers


@pytest.mark.parametrize("method", list(CASES))
def test_two_gloo_processes_unlearn_as_one(inputs, method):
    overrides, trainable_of = CASES[method]
    single_stats, single, single_log = unlearn(inputs, 1, f"{method}-one", *overrides)
    sharded_stats, sharded, sharded_log = unlearn(inputs, 2, f"{method}-two", *overrides)
    target = load_file(str(inputs / "target" / stages.MODEL_DIR / "model.safetensors"))
    assert single_stats["method"] == sharded_stats["method"] == method
    assert (single_stats["devices"], sharded_stats["devices"]) == (1, 2)
    assert single_stats["steps"] == sharded_stats["steps"] == 3
    assert set(sharded) == set(single) == set(target)
    assert_same_weights(single, sharded, adamw=method in STATE_TENSORS)
    moved = 0
    for name, weights in single.items():
        trainable = trainable_of(name, weights)
        # Frozen entries: bit for bit the target's, in both runs.
        assert torch.equal(sharded[name][~trainable], target[name][~trainable]), name
        assert torch.equal(weights[~trainable], target[name][~trainable]), name
        moved += int((sharded[name][trainable] != target[name][trainable]).sum())
    assert moved > 0
    if method == "simu_rmu":  # layer 1's attention is trainable but above rmu_layer=0: no gradient reaches it
        for name, weights in single.items():
            if name.startswith("model.layers.1.self_attn"):
                assert torch.equal(weights, target[name]) and torch.equal(sharded[name], target[name]), name
    # Compact state only for trainable entries: the same total bytes as one process, except that each
    # process keeps its own copy of AdamW's per-tensor step counter (a 4-byte fp32 scalar, as
    # torch.optim.AdamW): one more per trainable tensor on the second process.
    counters = 4 * len(STATE_TENSORS.get(method, ()))
    assert sharded_stats["optimizer_state_bytes"] == single_stats["optimizer_state_bytes"] + counters
    assert sharded_stats["trainable_coordinates"] == single_stats["trainable_coordinates"]
    for key in ("forget_loss_first", "forget_loss_last", "retain_loss_last"):
        if single_stats[key] is None:  # no retain term (CE-U): NaN, written as null
            assert sharded_stats[key] is None, key
            continue
        assert sharded_stats[key] == pytest.approx(single_stats[key], rel=1e-5), key
    # Every step's logged figures. RMU's retain term starts at exactly 0 (the model is its reference)
    # and stays near 0, where only an absolute tolerance is meaningful.
    assert sharded_log["step"].tolist() == single_log["step"].tolist() == [1, 2, 3]
    for column in LOG_COLUMNS:
        np.testing.assert_allclose(sharded_log[column], single_log[column], rtol=1e-5, atol=1e-9, err_msg=column)
    assert (sharded_log["tokens"] == single_log["tokens"]).all()
