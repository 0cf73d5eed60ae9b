"""Unlearning engine: losses, trainer (masks, freezing, resume, NaN), methods, the ``unlearn`` stage.

Most tests use a random 2-layer Llama built here (milliseconds per step); the forgetting test and
the stage tests use the session's small trained target (``trained_small``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import model_factory
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from simu_core.config import ConfigError, UnlearnConfig, check_pipeline_models, load_config
from simu_core.data.jsonl import DataFileError
from simu_core.preferred import preferred_pairs
from simu_core.masking import NeuronMask
from simu_core.models.adapter import ArchitectureAdapter
from simu_core.optim import ColumnMask
from simu_core.prompting import IGNORE_INDEX, EncodedExample
from simu_core.unlearning import (
    LOG_COLUMNS,
    METHODS,
    NonFiniteLossError,
    Trainable,
    ForgetInputs,
    RetainInputs,
    UnlearningObjective,
    build_objective,
    build_trainer,
    get_method,
    kl_to_reference,
    latest_checkpoint,
    npo_loss,
    plan_batches,
    select_trainables,
    simnpo_loss,
    validate_unlearning,
)
from simu_core.unlearning.trainer import SophiaUnlearningTrainer

VOCAB, HIDDEN, FFN, LAYERS = 48, 16, 32, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def examples(count: int, seed: int) -> list[EncodedExample]:
    return model_factory.random_examples(count, seed, VOCAB)


FORGET, RETAIN = examples(6, seed=1), examples(12, seed=2)


def unlearn_config(**changes) -> UnlearnConfig:
    settings = dict(method="so_graddiff", lr=1e-2, epochs=2, batch_size=2, grad_accum=2, warmup_ratio=0.2,
                    weight_decay=0.1, hessian="soul", hessian_interval=2)
    settings.update(changes)
    return UnlearnConfig(**settings)


def some_mask(model, per_layer=((1, 5, 9), (0, 30))) -> NeuronMask:
    sizes = ArchitectureAdapter(model).neurons_per_layer()
    return NeuronMask(neurons=tuple(tuple(layer) for layer in per_layer), num_neurons=tuple(sizes))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(model, config, mask=None, **kwargs):
    trainer = build_trainer(model, FORGET, RETAIN, config, pad_token_id=0, mask=mask, progress=False, **kwargs)
    return trainer, trainer.train()


def assert_same_weights(a, b) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------- losses


def _logits_labels(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[:, 4:] = torch.randint(0, 11, (3, 3), generator=gen)
    return logits, labels


def test_losses_use_answer_tokens_only_and_match_their_formulas():
    logits, labels = _logits_labels()
    objective = UnlearningObjective(forget="ga", retain="nll")
    ce = F.cross_entropy(logits[:, 3:6].reshape(-1, 11), labels[:, 4:].reshape(-1))
    assert torch.allclose(objective.forget_term(ForgetInputs(logits, labels)), -ce)
    assert torch.allclose(objective.retain_term(RetainInputs(logits, labels)), ce)
    # Prompt positions do not count: changing their logits changes no loss.
    other = logits.clone()
    other[:, :3] += 5.0
    assert torch.equal(objective.forget_term(ForgetInputs(other, labels)), objective.forget_term(ForgetInputs(logits, labels)))
    # NPO equals (2/beta) log 2 where the model equals its reference, and grows as p(y) falls below it.
    beta = 0.5
    assert math.isclose(float(npo_loss(logits, labels, logits, beta)), 2 / beta * math.log(2), rel_tol=1e-6)
    lower = logits.clone()
    lower[:, 3:6] -= F.one_hot(labels[:, 4:], 11) * 3.0
    assert float(npo_loss(lower, labels, logits, beta)) < 2 / beta * math.log(2)
    # SimNPO: -(2/beta) log sigmoid(-(beta/|y|) log p(y|x) - gamma) per sequence.
    logp = torch.log_softmax(logits[:, 3:6], -1).gather(-1, labels[:, 4:, None]).squeeze(-1).sum(-1)
    expected = -(2 / beta) * F.logsigmoid(-beta * logp / 3 - 0.3).mean()
    assert torch.allclose(simnpo_loss(logits, labels, beta, 0.3), expected)
    # KL to the reference: zero against itself, positive otherwise.
    assert float(kl_to_reference(logits, labels, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_reference(logits, labels, _logits_labels(1)[0])) > 0.01


def test_simnpo_has_its_own_beta_and_margin():
    # SimNPO once read NPO's beta (0.1): a per-sequence weight in [0.76, 1.0], i.e. plain
    # length-normalised gradient ascent. Its own beta defaults to open-unlearning's 4.5.
    logits, labels = _logits_labels()
    config = UnlearnConfig(method="simnpo")
    assert (config.simnpo_beta, config.simnpo_gamma, config.npo_beta) == (4.5, 0.0, 0.1)
    objective = build_objective(config)
    assert torch.equal(objective.forget_term(ForgetInputs(logits, labels)), simnpo_loss(logits, labels, 4.5, 0.0))
    changed = build_objective(config.model_copy(update={"simnpo_beta": 2.5, "simnpo_gamma": 0.3, "npo_beta": 7.0}))
    assert torch.equal(changed.forget_term(ForgetInputs(logits, labels)), simnpo_loss(logits, labels, 2.5, 0.3))
    npo = build_objective(UnlearnConfig(method="npo", npo_beta=0.2, simnpo_beta=9.0))
    assert torch.equal(npo.forget_term(ForgetInputs(logits, labels, reference_logits=logits - 1)), npo_loss(logits, labels, logits - 1, 0.2))
    for override, field in (("unlearn.simnpo_beta=0", "unlearn.simnpo_beta"),
                            ("unlearn.simnpo_gamma=-1", "unlearn.simnpo_gamma")):
        with pytest.raises(ConfigError, match=field):
            load_config(overrides=[override])
    with pytest.raises(ValueError, match="simnpo_beta must be > 0"):
        UnlearningObjective(forget="simnpo", simnpo_beta=0.0)


def test_objective_rejects_unknown_losses():
    with pytest.raises(ValueError, match="unknown forget loss"):
        UnlearningObjective(forget="sgd")
    with pytest.raises(ValueError, match="unknown retain loss"):
        UnlearningObjective(retain="mse")


# ------------------------------------------------------------------------------------ batches


def test_plan_pairs_every_forget_batch_with_a_seeded_retain_batch():
    plan = plan_batches(5, 9, batch_size=2, grad_accum=2, epochs=3, max_steps=None, seed=4)
    assert plan == plan_batches(5, 9, 2, 2, 3, None, seed=4)
    assert plan != plan_batches(5, 9, 2, 2, 3, None, seed=5)
    micro = [m for step in plan for m in step]
    assert len(micro) == 9 and len(plan) == 5 and len(plan[-1]) == 1  # the last step is partial
    for epoch in range(3):
        seen = sorted(i for m in micro if m.epoch == epoch for i in m.forget)
        assert seen == list(range(5))  # every forget item once per epoch
    assert all(len(m.retain) == len(m.forget) and len(set(m.retain)) == len(m.retain) for m in micro)
    assert len(plan_batches(5, 9, 2, 2, 1, max_steps=7, seed=4)) == 7  # max_steps overrides epochs


# ------------------------------------------------------------------------------ masks/freezing


@pytest.mark.parametrize("hessian", ["soul", "gnb"])
def test_all_ones_mask_gives_exactly_the_unmasked_result(hessian):
    # A small max_grad_norm keeps clipping active, so the masked gradient norm is exercised too.
    config = unlearn_config(method="simu", hessian=hessian, max_grad_norm=0.05)
    results = []
    for variant in ("columns", "dense", "none"):
        model = tiny_model()
        trainables = select_trainables(model, get_method("simu"), some_mask(model, [range(FFN)] * LAYERS))
        if variant != "columns":
            trainables = [
                Trainable(t.name, t.param, None if variant == "none" else torch.ones_like(t.param, dtype=torch.bool),
                          t.decay)
                for t in trainables
            ]
        assert any(isinstance(t.mask, ColumnMask) for t in trainables) == (variant == "columns")
        trainer = SophiaUnlearningTrainer(
            model, trainables, UnlearningObjective(), FORGET, RETAIN, config, pad_token_id=0, hessian=hessian,
            progress=False,
        )
        results.append((model, trainer.train().log))
    (columns, log_c), (dense, log_d), (plain, log_p) = results
    assert_same_weights(columns, plain)
    assert_same_weights(dense, plain)
    pd.testing.assert_frame_equal(log_c, log_p)
    pd.testing.assert_frame_equal(log_d, log_p)
    assert (log_p["grad_norm"] > 0.05).all()
    start = tiny_model()
    assert not torch.equal(plain.model.layers[0].self_attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("train_attention", [True, False])
def test_simu_freezes_every_other_entry_exactly(train_attention):
    model = tiny_model()
    mask = some_mask(model)
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = unlearn_config(method="simu", weight_decay=0.5, train_attention=train_attention)
    trainer, result = train(model, config, mask)
    after = dict(model.named_parameters())
    adapter = ArchitectureAdapter(model)
    attention = {name for name, _ in adapter.attention_parameters()}
    downs = {f"{d.name}.weight": d for d in adapter.down_projections()}
    for name, value in before.items():
        if name in downs:
            critical = mask.layer_indices(downs[name].layer)
            frozen = torch.ones(FFN, dtype=torch.bool)
            frozen[critical] = False
            assert torch.equal(after[name][:, frozen], value[:, frozen]), f"{name}: a frozen column moved"
            changed = (after[name][:, critical] != value[:, critical]).any(dim=0)
            assert bool(changed.all()), f"{name}: a critical column did not move"
        elif name in attention and train_attention:
            assert not torch.equal(after[name], value), f"{name}: attention did not move"
        else:  # embeddings, norms, gate/up, LM head (and attention when it is switched off)
            assert torch.equal(after[name], value), f"{name}: frozen tensor moved"
    # No optimizer state for frozen tensors; compact state for the critical columns only.
    state = trainer.optimizer.state
    stateful = {name for name, p in model.named_parameters() if p in state}
    assert stateful == set(downs) | (attention if train_attention else set())
    for name, d in downs.items():
        assert state[d.weight]["exp_avg"].shape == (HIDDEN, mask.counts()[d.layer])
    assert result.trainable_coordinates == sum(mask.counts()) * HIDDEN + (
        sum(p.numel() for _, p in adapter.attention_parameters()) if train_attention else 0
    )
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags  # restored afterwards
    assert result.log["win_rate"].between(0, 1).all()


# ------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "changes",
    [dict(method="simu", hessian="gnb"), dict(method="fo_graddiff"), dict(method="npo", retain_loss="kl")],
    ids=["simu-gnb", "fo_graddiff", "npo-kl"],
)
def test_interrupted_run_resumes_bit_identically(tmp_path, changes):
    config = unlearn_config(epochs=3, checkpoint_every=2, **changes)
    mask = some_mask(tiny_model())
    uninterrupted = tiny_model()
    full = train(uninterrupted, config, mask)[1].log
    assert len(full) == 5

    with pytest.raises(RuntimeError, match="injected fault.*step 5"):
        train(tiny_model(), config, mask, checkpoint_dir=tmp_path, fail_at_step=5)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000004"]  # older ones pruned, no temp

    resumed = tiny_model()  # a fresh process: start weights, state from the checkpoint
    result = train(resumed, config, mask, checkpoint_dir=tmp_path)[1]
    assert result.resumed_from == 4
    assert_same_weights(resumed, uninterrupted)
    pd.testing.assert_frame_equal(result.log, full)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    config = unlearn_config(epochs=3, checkpoint_every=2)
    with pytest.raises(RuntimeError):
        train(tiny_model(), config, checkpoint_dir=tmp_path, fail_at_step=4)
    with pytest.raises(ValueError, match="different run"):
        train(tiny_model(), config.model_copy(update={"lr": 2e-2}), checkpoint_dir=tmp_path)


# ------------------------------------------------------------------------------------- failure


def test_nan_loss_stops_with_the_step_and_no_checkpoint_for_it(tmp_path):
    model = tiny_model()
    poisoned = {"on": False}

    def poison(module, args, output):
        if poisoned["on"]:
            output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(poison)

    def callback(step, total, row):
        poisoned["on"] = step == 2  # the forward passes of step 3 return NaN

    config = unlearn_config(checkpoint_every=1, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite forget loss \(nan\) at step 3 \(micro-batch 1\)"):
        train(model, config, checkpoint_dir=tmp_path, progress_callback=callback)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002"]


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_training():
    model = tiny_model()
    before = snapshot(model)
    good = unlearn_config(method="simu")
    mask = some_mask(model)
    cases = [
        (good.model_copy(update={"method": "sgd"}), mask, "unknown unlearning method 'sgd'"),
        (good.model_copy(update={"hessian": "exact"}), mask, "unknown unlearn.hessian 'exact'"),
        (good.model_copy(update={"lr": 0.0}), mask, "lr must be > 0"),
        (good.model_copy(update={"lr": -1e-3, "method": "fo_graddiff"}), None, "lr must be > 0"),
        (good, NeuronMask(neurons=((), (), ()), num_neurons=(FFN,) * 3), "does not match the model"),
        (good, NeuronMask(neurons=((1,), ()), num_neurons=(FFN, FFN + 1)), "does not match the model"),
        (good.model_copy(update={"train_attention": False}), some_mask(model, [(), ()]), "mask is empty"),
        (good, None, "needs a critical-neuron mask"),
    ]
    for config, bad_mask, message in cases:
        with pytest.raises(ValueError, match=message):
            build_trainer(model, FORGET, RETAIN, config, pad_token_id=0, mask=bad_mask, progress=False)
    with pytest.raises(ValueError, match="at least one forget example"):
        build_trainer(model, [], RETAIN, unlearn_config(), pad_token_id=0)
    with pytest.raises(ConfigError, match="unlearn.lr"):
        load_config(overrides=["unlearn.lr=0"])
    # An empty mask is fine while attention is trained.
    validate_unlearning(good, model, some_mask(model, [(), ()]))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


# ------------------------------------------------------------------------------------ methods


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_logs(method):
    model = tiny_model()
    before = snapshot(model)
    config = unlearn_config(method=method, max_steps=3, warmup_ratio=0.4, hessian="gnb", hessian_interval=2)
    calls = []
    trainer, result = train(model, config, some_mask(model), progress_callback=lambda *a: calls.append(a))
    log = result.log
    assert list(log.columns) == list(LOG_COLUMNS) and list(log["step"]) == [1, 2, 3]
    assert [(s, t) for s, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert np.isfinite(log[["forget_loss", "objective", "lr", "grad_norm"]].to_numpy()).all()
    spec = METHODS[method]
    assert np.isfinite(log["retain_loss"]).all() == spec.uses_retain
    assert np.isfinite(log["win_rate"]).all() == (spec.optimizer == "sophia")
    assert log["lr"].iloc[0] == 0.0 and log["lr"].iloc[1] == pytest.approx(config.lr)  # warm-up, then decay
    embedding = model.model.embed_tokens.weight
    assert torch.equal(embedding, before["model.embed_tokens.weight"]) == (spec.scope == "simu")
    if spec.optimizer == "sophia":  # gnb refreshed h at step 1 already
        assert any(float(s["hessian"].abs().sum()) > 0 for s in trainer.optimizer.state.values())


# ------------------------------------------------------------------------------ trained target


@pytest.fixture(scope="module")
def small(request, one_torch_thread):
    # Requested from the body so the (session) training runs under the one-thread setting above.
    return request.getfixturevalue("trained_small")


@pytest.fixture(scope="module")
def small_mask(small, tmp_path_factory):
    """Forget-critical neurons of the small target (fast attribution, t = 0.2), saved as mask.parquet."""
    from simu_core.attribution import attribute_neurons
    from simu_core.finetune import encode_frame
    from simu_core.prompting import pad_token_id
    from simu_core.stages import load_trained, read_benchmark
    from simu_core.thresholding import critical_neurons

    config = small["config"]
    model, tokenizer = load_trained(small["target"], config)
    forget = encode_frame(tokenizer, read_benchmark(small["data"])["forget"], config.model.max_length)
    scores = attribute_neurons(model, forget, pad_token_id(tokenizer), steps=3, progress=False)
    mask = critical_neurons(scores.scores, threshold=0.2)
    folder = tmp_path_factory.mktemp("small_mask")
    mask.save(folder / "mask.parquet")
    return folder, mask


def _set_nlls(config, model_dir, data_dir):
    from simu_core.finetune import encode_frame
    from simu_core.prompting import pad_token_id
    from simu_core.scoring import answer_nlls
    from simu_core.stages import load_trained, read_benchmark

    model, tokenizer = load_trained(model_dir, config)
    benchmark = read_benchmark(data_dir)
    return {
        split: float(answer_nlls(model, encode_frame(tokenizer, benchmark[split], config.model.max_length),
                                 pad_token_id(tokenizer)).mean())
        for split in ("forget", "retain")
    }


# Stated bound: on the small target (answer NLL ~0.001 on both sets before unlearning), 5 epochs must
# raise the mean forget NLL above 1.0 (p(answer token) < 0.37 on average) while the mean retain NLL
# stays below 0.5 (p > 0.6).
FORGET_NLL_MIN, RETAIN_NLL_MAX = 1.0, 0.5


@pytest.mark.parametrize("method,lr", [("simu", 1e-3), ("so_graddiff", 3.5e-4)])
def test_forget_loss_rises_while_retain_loss_stays_bounded(small, small_mask, tmp_path, method, lr):
    from simu_core.stages import unlearn

    config = small["config"].model_copy(deep=True)
    config.unlearn = config.unlearn.model_copy(update={"method": method, "lr": lr, "epochs": 5})
    summary = unlearn(config, small["data"], small["target"], small_mask[0], tmp_path, progress=False)
    before = _set_nlls(config, small["target"], small["data"])
    after = _set_nlls(config, tmp_path, small["data"])
    assert before["forget"] < 0.05 and before["retain"] < 0.05
    assert after["forget"] > FORGET_NLL_MIN, (method, before, after)
    assert after["retain"] < RETAIN_NLL_MAX, (method, before, after)
    assert summary["forget_loss_last"] > summary["forget_loss_first"]


def test_unlearn_stage_writes_model_log_and_resumes(small, small_mask, tmp_path):
    from simu_core.stages import MODEL_DIR, load_trained, unlearn

    config = small["config"].model_copy(deep=True)
    config.unlearn = config.unlearn.model_copy(update={"method": "simu", "epochs": 2, "checkpoint_every": 3})
    calls = []
    summary = unlearn(config, small["data"], small["target"], small_mask[0], tmp_path / "full", progress=False,
                      progress_callback=lambda step, total, row: calls.append((step, total)))
    assert summary["steps"] == 10 and calls == [(s, 10) for s in range(1, 11)]
    assert summary["mask_neurons"] == small_mask[1].total() and summary["resumed_from"] is None
    assert not (tmp_path / "full" / "checkpoints").exists()  # the stage's own checkpoints are removed
    log = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    assert list(log.columns) == list(LOG_COLUMNS) and len(log) == 10
    model, _ = load_trained(tmp_path / "full", config)  # a loadable Hugging Face folder
    assert (tmp_path / "full" / MODEL_DIR / "model.safetensors").is_file()
    assert (tmp_path / "full" / MODEL_DIR / "tokenizer.json").is_file()

    config.run.fail_at_unlearn_step = 8
    with pytest.raises(RuntimeError, match="injected fault"):
        unlearn(config, small["data"], small["target"], small_mask[0], tmp_path / "crashed",
                checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "crashed" / MODEL_DIR).exists()
    (run_folder,) = (tmp_path / "ckpt").iterdir()  # one subfolder per run under a shared root
    assert latest_checkpoint(run_folder).name == "checkpoint-00000006"

    # Another run sharing the root (a different lr) starts afresh and leaves the crashed one alone.
    other = config.model_copy(deep=True)
    other.run.fail_at_unlearn_step = None
    other.unlearn = other.unlearn.model_copy(update={"lr": 2e-3})
    fresh = unlearn(other, small["data"], small["target"], small_mask[0], tmp_path / "other",
                    checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert fresh["resumed_from"] is None and list((tmp_path / "ckpt").iterdir()) == [run_folder]

    config.run.fail_at_unlearn_step = None
    resumed = unlearn(config, small["data"], small["target"], small_mask[0], tmp_path / "resumed",
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert resumed["resumed_from"] == 6
    assert list((tmp_path / "ckpt").iterdir()) == []  # a finished run's checkpoints are removed
    full = load_file(str(tmp_path / "full" / MODEL_DIR / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / MODEL_DIR / "model.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "resumed" / "train_log.parquet"), log)


def test_unlearn_stage_nan_writes_no_finished_model(small, small_mask, tmp_path):
    from simu_core.stages import MODEL_DIR, unlearn

    corrupted = tmp_path / "target"
    shutil.copytree(small["target"], corrupted)
    weights_path = corrupted / MODEL_DIR / "model.safetensors"
    weights = load_file(str(weights_path))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    config = small["config"].model_copy(deep=True)
    config.unlearn = config.unlearn.model_copy(update={"method": "so_graddiff", "checkpoint_every": 1})
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        unlearn(config, small["data"], corrupted, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MODEL_DIR).exists() and not (tmp_path / "out" / "train_log.parquet").exists()
    assert not list((tmp_path / "out").rglob("checkpoint-*"))


# ------------------------------------------------------------- preference losses' stages (small target)
# The preferred answers of IdkDPO (an "I don't know" file), DPO (the user's file) and AltPO (the
# generate_alternates stage).


def _preference_config(small, **unlearn_settings):
    config = small["config"].model_copy(deep=True)
    config.unlearn = config.unlearn.model_copy(update={"epochs": 1, "stop_at": None, **unlearn_settings})
    return config


def test_alternates_stage_samples_each_forget_item_reproducibly(small, tmp_path):
    from simu_core.stages import ALTERNATES_FILE, generate_alternates, read_benchmark, unlearn

    config = _preference_config(small, altpo_alternates=2, altpo_max_new_tokens=8)
    summary = generate_alternates(config, small["data"], small["target"], tmp_path / "a")
    alternates = pd.read_parquet(tmp_path / "a" / ALTERNATES_FILE)
    forget = read_benchmark(small["data"])["forget"]
    assert summary["alternates"] == len(alternates) == 2 * len(forget)
    assert list(alternates["item_id"][::2]) == list(forget["item_id"]) and set(alternates["sample"]) == {0, 1}
    assert summary["empty"] + summary["equal_to_answer"] <= len(alternates)
    generate_alternates(config, small["data"], small["target"], tmp_path / "b")
    pd.testing.assert_frame_equal(alternates, pd.read_parquet(tmp_path / "b" / ALTERNATES_FILE))  # same seed
    config.run.seed = 1
    generate_alternates(config, small["data"], small["target"], tmp_path / "c")
    assert not alternates["alternate"].equals(pd.read_parquet(tmp_path / "c" / ALTERNATES_FILE)["alternate"])
    # AltPO trains on every (forget answer, alternate) pair.
    rows, preferred = preferred_pairs("altpo", forget, seed=0, alternates=alternates)
    assert len(rows) == len(preferred) == len(alternates) and list(rows["item_id"][:2]) == [forget["item_id"][0]] * 2


def test_altpo_and_idk_dpo_unlearn_from_their_preferred_answers(small, small_mask, tmp_path):
    from simu_core.stages import ALTERNATES_FILE, generate_alternates, read_benchmark, unlearn

    config = _preference_config(small, method="altpo", altpo_alternates=2, altpo_max_new_tokens=8, lr=1e-3)
    generate_alternates(config, small["data"], small["target"], tmp_path / "alternates")
    summary = unlearn(config, small["data"], small["target"], None, tmp_path / "altpo", progress=False,
                      alternates_dir=tmp_path / "alternates")
    forget = len(read_benchmark(small["data"])["forget"])
    assert summary["method"] == "altpo" and summary["forget_items"] == 2 * forget
    log = pd.read_parquet(tmp_path / "altpo" / "train_log.parquet")
    assert log["forget_term"].iloc[-1] < log["forget_term"].iloc[0]  # DPO's loss falls from (2/beta) log 2

    idk = tmp_path / "idk.jsonl"
    idk.write_text("I don't know.\nNo idea.\n")
    config = _preference_config(small, method="simu_idk_dpo", idk_source=str(idk), lr=1e-3)
    summary = unlearn(config, small["data"], small["target"], small_mask[0], tmp_path / "idk", progress=False)
    assert summary["method"] == "simu_idk_dpo" and summary["forget_items"] == forget


def test_dpo_reads_the_users_preferred_answers_and_names_what_is_missing(small, tmp_path):
    from simu_core.stages import ALTERNATES_FILE, generate_alternates, read_benchmark, unlearn

    forget = read_benchmark(small["data"])["forget"]
    path = tmp_path / "preferred.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "Somebody else."}) + "\n"
                            for q in forget["question"][1:]))
    with pytest.raises(DataFileError, match="no answer for 1 of the"):
        preferred_pairs("dpo", forget, seed=0, preferred_source=str(path))
    with path.open("a") as handle:
        handle.write(json.dumps({"question": forget["question"][0], "answer": "Nobody."}) + "\n")
    rows, preferred = preferred_pairs("dpo", forget, seed=0, preferred_source=str(path))
    assert preferred[0] == "Nobody." and preferred[1:] == ["Somebody else."] * (len(forget) - 1)


def test_preference_losses_are_refused_where_they_cannot_run():
    with pytest.raises(ConfigError, match="needs unlearn.preferred_source"):
        check_pipeline_models(load_config(overrides=["unlearn.loss=dpo"]))
    with pytest.raises(ConfigError, match="LUME's forget items are\\s+document continuations"):
        check_pipeline_models(load_config(overrides=["data.benchmark=lume", "unlearn.stop_at=null",
                                                     "model.base=some-org/some-model", "unlearn.loss=idk_dpo"]))
    with pytest.raises(ConfigError, match="column-masked AdamW"):
        check_pipeline_models(load_config(overrides=["unlearn.method=fo_simu_npo", "run.devices=2"]))
    with pytest.raises(DataFileError, match="unlearn.idk_source"):
        preferred_pairs("idk_dpo", pd.DataFrame({"question": ["q"], "answer": ["a"]}), seed=0,
                        configured_idk="/nonexistent/idk.jsonl")


def test_version_1_methods_train_the_same_model_as_before_losses_x_scopes():
    # Recorded with the trainer of commit 5d099bb (before a method became loss x optimizer x scope): per
    # version-1 method and retain loss, the per-step objective and the final weights' sum of squares of a
    # seeded run. The code path of these methods is unchanged, so both agree (bit for bit on this machine;
    # a tolerance keeps the test to what another CPU's kernels may round differently).
    recorded = json.loads((Path(__file__).parent / "data" / "unlearning_v1.json").read_text())
    for name, expected in recorded.items():
        method, retain_loss = name.split("/")
        model = tiny_model(3)
        config = unlearn_config(method=method, retain_loss=retain_loss, lr=5e-3, epochs=2)
        trainer = build_trainer(model, FORGET, RETAIN, config, pad_token_id=0, mask=some_mask(model), progress=False,
                                seed=1)
        log = trainer.train().log
        assert list(log["objective"]) == pytest.approx(expected["objective"], rel=1e-5, abs=1e-7), name
        sum_sq = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
        assert sum_sq == pytest.approx(expected["sum_sq"], rel=1e-9), name
