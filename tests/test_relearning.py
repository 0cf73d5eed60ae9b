"""The relearning attack: the split, the attack loop, recovery, the stage in the pipeline, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simu_core.config import ConfigError, RelearnConfig, load_config
from simu_core.attacks.relearn import (
    check_attack_sizes,
    curve_steps,
    format_recovery,
    recovery_headline,
    recovery_table,
    relearning_split,
)


def test_split_is_seeded_disjoint_and_covers_every_item():
    train, measured = relearning_split(10, 0.5, seed=3)
    assert len(train) == 5 and len(measured) == 5
    assert sorted([*train, *measured]) == list(range(10))
    again = relearning_split(10, 0.5, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(measured, again[1])
    assert not np.array_equal(train, relearning_split(10, 0.5, seed=4)[0])
    assert len(relearning_split(10, 0.3, seed=0)[0]) == 3


@pytest.mark.parametrize("items, fraction, train, measured", [(3, 0.1, 0, 3), (3, 0.9, 3, 0), (1, 0.5, 0, 1)])
def test_a_fraction_that_leaves_an_empty_part_is_refused(items, fraction, train, measured):
    with pytest.raises(ValueError, match=rf"relearn.fraction={fraction} of {items} forget items gives {train} item\(s\) "
                                         rf"to relearn on and {measured} to measure"):
        relearning_split(items, fraction, seed=0)


def test_retain_only_needs_as_many_retain_items():
    check_attack_sizes(RelearnConfig(data="retain_only"), forget_items=10, retain_items=5)
    with pytest.raises(ValueError, match="relearn.data='retain_only' needs 5 retain items.*has 4"):
        check_attack_sizes(RelearnConfig(data="retain_only"), forget_items=10, retain_items=4)


def test_config_refuses_zero_steps_and_lume_and_fills_the_benchmark_lr():
    with pytest.raises(ConfigError, match="relearn.steps"):
        load_config(overrides=["relearn.steps=0"])
    with pytest.raises(ConfigError, match="relearn.fraction"):
        load_config(overrides=["relearn.fraction=1.0"])
    with pytest.raises(ConfigError, match=r"attacks=\['relearn'\] \(relearn.enabled=true adds relearn\) with data.benchmark='lume'"):
        load_config(overrides=["relearn.enabled=true", "data.benchmark=lume", "model.target=some/model"])
    assert load_config().relearn.lr == 1e-3
    assert load_config(overrides=["data.benchmark=tofu"]).relearn.lr == 1e-5
    assert load_config(overrides=["relearn.lr=0.01"]).relearn.lr == 0.01


def test_config_refuses_the_attack_on_several_devices():
    # The attack runs in one process: a run sharded over devices would relearn unsharded.
    with pytest.raises(ConfigError, match=r"relearn.enabled=true with run.devices=2: .*one process"):
        load_config(overrides=["relearn.enabled=true", "run.devices=2"])
    assert load_config(overrides=["relearn.enabled=false", "run.devices=2"]).run.devices == 2
    assert load_config(overrides=["relearn.enabled=true", "run.devices=1"]).relearn.enabled


def test_curve_steps():
    assert curve_steps(10, 2) == [0, 2, 4, 6, 8, 10]
    assert curve_steps(7, 3) == [0, 3, 6, 7]
    assert curve_steps(1, 5) == [0, 1]


def _curves(unlearned, target, reference, rouge=(0.2, 0.4, 0.5)):
    frames = []
    for model, probs, scale in (("unlearned", unlearned, 1.0), ("target", target, 2.0), ("reference", reference, 1.0)):
        frames.append(pd.DataFrame({"model": model, "step": [0, 5, 10], "forget_prob": probs,
                                    "forget_rouge": [r * scale for r in rouge], "forget_truth_ratio": 0.5}))
    return pd.concat(frames, ignore_index=True)


def test_recovery_and_regained_by_hand():
    curves = _curves(unlearned=[0.01, 0.30, 0.60], target=[0.90, 0.95, 0.97], reference=[0.05, 0.10, 0.20])
    table = recovery_table(curves)
    # recovery = unlearned / reference per step; regained = (u(k) - u(0)) / (target(0) - u(0)).
    assert table["recovery"].tolist() == pytest.approx([0.2, 3.0, 3.0])
    assert table["recovery_rouge"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert table["regained"].tolist() == pytest.approx([0.0, 0.29 / 0.89, 0.59 / 0.89])
    figures = recovery_headline(curves)
    assert figures["relearn_recovery"] == pytest.approx(3.0)
    assert figures["relearn_regained"] == pytest.approx(0.59 / 0.89)
    assert figures["relearn_reference_forget_prob_after"] == pytest.approx(0.20)
    assert figures["relearn_target_forget_prob_before"] == pytest.approx(0.90)
    # Unlearning that removed nothing has no "regained" share.
    nothing_removed = recovery_table(_curves([0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.1, 0.2, 0.3]))
    assert nothing_removed["regained"].isna().all()


def test_recovery_needs_the_curves_with_the_same_steps_and_is_nan_without_a_reference():
    curves = _curves([0.1, 0.3, 0.5], [0.9] * 3, [0.1] * 3)
    with pytest.raises(ValueError, match=r"missing \['target'\]"):
        recovery_table(curves[curves["model"] != "target"])
    # A run without a retain reference (WMDP): recovery is undefined, regained is not.
    alone = recovery_table(curves[curves["model"] != "reference"])
    assert alone["recovery"].isna().all() and alone["regained"].tolist() == pytest.approx([0.0, 0.25, 0.5])
    figures = recovery_headline(curves[curves["model"] != "reference"])
    assert "relearn_reference_forget_prob_after" not in figures and figures["relearn_regained"] == pytest.approx(0.5)
    assert [line.split()[0] for line in format_recovery(figures)[1:]] == ["unlearned", "target"]
    shifted = curves.copy()
    shifted.loc[shifted["model"] == "target", "step"] = [0, 4, 10]
    with pytest.raises(ValueError, match="the target's relearning curve has steps"):
        recovery_table(shifted)


# ----------------------------------------------------------------------------------------------
# The attack on a real (small) model


def test_forget_measures_are_the_evaluation_suites(trained_small, one_torch_thread):
    """The attack's measures on a set of forget items equal evaluate_qa's forget metrics on them."""
    from simu_core.evaluation import evaluate_qa
    from simu_core.attacks.relearn import forget_measures
    from simu_core.stages import load_trained, read_benchmark

    config = trained_small["config"]
    benchmark = read_benchmark(trained_small["data"])
    model, tokenizer = load_trained(trained_small["target"], config)
    eval_config = config.eval.model_copy(update={"max_items": 6})
    measures = forget_measures(model, tokenizer, benchmark["forget"].iloc[:6], eval_config, config.model.max_length)
    suite = evaluate_qa(model, tokenizer, benchmark, eval_config, max_length=config.model.max_length).headline()
    for name in ("forget_prob", "forget_rouge", "forget_truth_ratio"):
        assert measures[name] == pytest.approx(suite[name], rel=1e-6), name


def test_attack_relearns_the_items_it_trains_on_and_is_deterministic(trained_small, one_torch_thread):
    from simu_core.attacks.relearn import relearn_curve
    from simu_core.stages import load_trained, read_benchmark

    config = trained_small["config"]
    benchmark = read_benchmark(trained_small["data"])
    eval_config = config.eval.model_copy(update={"max_new_tokens": 8})
    items = benchmark["forget"].iloc[:4]
    settings = RelearnConfig(steps=6, eval_every=3, batch_size=4)
    # The retain reference never saw these items: training on them raises their probability.
    curves = []
    for _ in range(2):
        model, tokenizer = load_trained(trained_small["reference"], config)
        curves.append(relearn_curve(model, tokenizer, items, items, settings, eval_config, lr=3e-3,
                                    max_length=config.model.max_length, seed=0, progress=False))
    curve = curves[0]
    assert curve["step"].tolist() == [0, 3, 6]
    assert math.isnan(curve["loss"].iloc[0]) and curve["loss"].iloc[-1] < 2.0
    assert curve["forget_prob"].iloc[-1] > 2 * curve["forget_prob"].iloc[0]
    pd.testing.assert_frame_equal(curves[0].drop(columns="seconds"), curves[1].drop(columns="seconds"))


# ----------------------------------------------------------------------------------------------
# The stage in the pipeline


@pytest.fixture(scope="module")
def relearn_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("relearn")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}", "knockout.enabled=false",
            "unlearn.method=so_graddiff", "relearn.enabled=true", "relearn.steps=4", "relearn.eval_every=2"], root


def test_relearn_stage_in_the_pipeline_reports_recovery_and_shares_the_reference_attacks(prefect_api, relearn_workspace):
    from test_pipeline import PIPELINE_OVERRIDES

    from flows.pipeline import simu_pipeline

    paths, root = relearn_workspace
    first = simu_pipeline(overrides=PIPELINE_OVERRIDES + paths)
    for label in ("relearn", "relearn_target", "relearn_reference"):
        assert first["states"][label] == "Completed", label
    run_dir = Path(first["run_dir"])
    curve = pd.read_parquet(run_dir / "relearn_curve.parquet")
    assert sorted(curve["model"].unique()) == ["reference", "target", "unlearned"]
    assert sorted(curve["step"].unique()) == [0, 2, 4]
    recovery = pd.read_parquet(run_dir / "relearn_recovery.parquet")
    unlearned = curve[curve["model"] == "unlearned"].set_index("step")["forget_prob"]
    reference = curve[curve["model"] == "reference"].set_index("step")["forget_prob"]
    assert recovery["recovery"].tolist() == pytest.approx((unlearned / reference).tolist())
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    assert runs["metric.relearn_recovery"].iloc[-1] == pytest.approx(recovery["recovery"].iloc[-1])
    assert first["relearn"]["relearn_recovery"] == pytest.approx(recovery["recovery"].iloc[-1])
    assert "## Relearning attack" in first["markdown"]

    # Another unlearning lr: only the unlearned model's attack is new; the target's and the
    # reference's are shared.
    other = simu_pipeline(overrides=PIPELINE_OVERRIDES + paths + ["unlearn.lr=1e-3"])
    assert other["states"]["relearn"] == "Completed"
    assert other["states"]["relearn_target"] == other["states"]["relearn_reference"] == "Cached"
    # Attack settings are in the key: more steps recompute all three, nothing before them.
    longer = simu_pipeline(overrides=PIPELINE_OVERRIDES + paths + ["relearn.steps=6"])
    assert {longer["states"][label] for label in ("relearn", "relearn_target", "relearn_reference")} == {"Completed"}
    assert longer["states"]["unlearn"] == longer["states"]["evaluate"] == "Cached"

    from flows.report import write_report

    written = write_report(root / "results")
    assert "## Relearning attack" in written["markdown"] and Path(written["plots"]["relearning"]).stat().st_size > 0
    table = pd.read_csv(root / "results" / "report" / "relearning.csv")
    assert len(table) == 3  # two unlearning lrs, and more attack steps
    assert table["recovery_mean"].notna().all()


def test_an_empty_half_is_refused_before_any_training(prefect_api, tmp_path):
    from test_pipeline import PIPELINE_OVERRIDES

    from flows.pipeline import simu_pipeline

    paths = [f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}", "relearn.enabled=true",
             "relearn.fraction=0.01"]
    with pytest.raises(ValueError, match="relearn.fraction=0.01 of 10 forget items gives 0 item"):
        simu_pipeline(overrides=PIPELINE_OVERRIDES + paths)
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    states = {column: runs[column].iloc[-1] for column in runs if column.startswith("state.")}
    assert states == {"state.prepare_data": "Completed"}  # nothing was trained


@pytest.mark.parametrize("overrides, message", [
    (["relearn.enabled=true", "relearn.fraction=0.01"],
     "error: relearn.fraction=0.01 of 40 forget items gives 0 item(s) to relearn on and 40 to measure"),
    (["data.requests=[[forget-0:10], [forget-10:50]]"],
     "error: data.requests: request 2 names items not in the benchmark (its forget split has 40 items"),
])
def test_cli_refuses_bad_forget_set_uses_before_starting_anything(capsys, overrides, message):
    from flows.cli import build_parser, command_run

    arguments = ["run"]
    for override in overrides:
        arguments += ["--set", override]
    # command_run, not main: main's shutdown bounds the process's exit with a timer (os._exit).
    assert command_run(build_parser().parse_args(arguments)) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_attack_with_dropout_is_reproducible(trained_small, one_torch_thread):
    """Dropout draws from torch's global generator: the attack seeds it from its seed, so two attacks
    with the same seed give the same curve whatever ran before them."""
    from simu_core.attacks.relearn import relearn_curve
    from simu_core.stages import load_trained, read_benchmark

    config = trained_small["config"]
    items = read_benchmark(trained_small["data"])["forget"].iloc[:4]
    eval_config = config.eval.model_copy(update={"max_new_tokens": 4})
    settings = RelearnConfig(steps=4, eval_every=2, batch_size=4)
    curves = []
    for _ in range(2):
        model, tokenizer = load_trained(trained_small["reference"], config)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3  # read at every forward (training mode only)
        curves.append(relearn_curve(model, tokenizer, items, items, settings, eval_config, lr=3e-3,
                                    max_length=config.model.max_length, seed=0, progress=False))
    pd.testing.assert_frame_equal(curves[0].drop(columns="seconds"), curves[1].drop(columns="seconds"))
    # Dropout is on: a different seed gives a different training loss.
    model, tokenizer = load_trained(trained_small["reference"], config)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    other = relearn_curve(model, tokenizer, items, items, settings, eval_config, lr=3e-3,
                          max_length=config.model.max_length, seed=1, progress=False)
    assert other["loss"].iloc[-1] != curves[0]["loss"].iloc[-1]
