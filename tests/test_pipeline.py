"""The Prefect pipeline against a real (test-harness) Prefect API: caching, resume, corruption,
code versions, concurrency, deployments and the CLI's validation."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import PROJECT_ROOT

PIPELINE_OVERRIDES = [
    "unlearn.stop_at=null",  # a fixed budget (the default config stops at the reference's level)
    "data.num_authors=10", "data.holdout_authors=1", "data.general_facts=4",
    "model.tiny.num_layers=2", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=400", "model.max_length=64", "model.finetune.epochs=2",
    "attribution.max_items=6", "attribution.batch_size=6",
    "unlearn.max_steps=3", "unlearn.batch_size=4",
    "eval.max_items=6", "eval.max_new_tokens=8", "eval.batch_size=8",
]
UPSTREAM = ("prepare_data", "train_target", "train_retain_reference", "attribute_forget", "attribute_retain")
DOWNSTREAM = ("threshold_mask", "unlearn", "evaluate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}"], root


def run_flow(overrides):
    from flows.pipeline import simu_pipeline

    return simu_pipeline(overrides=PIPELINE_OVERRIDES + overrides)


def test_threshold_change_unchanged_rerun_and_results(prefect_api, workspace):
    paths, root = workspace
    first = run_flow(paths)
    assert all(state == "Completed" for state in first["states"].values()), first["states"]
    changed = run_flow(paths + ["mask.threshold=0.5"])
    for label in UPSTREAM:
        assert changed["states"][label] == "Cached", (label, changed["states"])
    for label in DOWNSTREAM:
        assert changed["states"][label] == "Completed", (label, changed["states"])
    assert changed["states"]["evaluate_reference"] == "Cached"
    again = run_flow(paths)
    assert set(again["states"].values()) == {"Cached"}, again["states"]

    runs = pd.read_parquet(root / "results" / "runs.parquet")
    assert len(runs) == 3 and set(runs["status"]) == {"completed"}
    assert runs["config.mask.threshold"].tolist() == [0.2, 0.5, 0.2]
    assert runs["forget_quality"].notna().all()
    run_dir = Path(again["run_dir"])
    for name in ("metrics.parquet", "items.parquet", "attribution.parquet", "mask.parquet", "dual_analysis.parquet",
                 "train_log.parquet", "config.yaml"):
        assert (run_dir / name).exists(), name
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert {"benchmark", "split", "metric", "value", "model"} <= set(metrics.columns)
    assert set(metrics["model"]) == {"unlearned", "target", "reference"}
    # The retain reference is evaluated lightly: only what forget quality and privleak compare;
    # what it did not compute is absent, in the tables and in the printed summary.
    reference = metrics[metrics["model"] == "reference"]
    assert set(reference["split"]) == {"forget", "holdout", "all"}
    assert again["reference_metrics"]["model_utility_computed"] == 0.0
    assert "model_utility" not in again["reference_metrics"] and "forget_truth_ratio" in again["reference_metrics"]
    from flows.cli import print_run_summary

    # Not capsys: Prefect's log handlers, created in this test, would keep its stream after it closes.
    with contextlib.redirect_stdout(io.StringIO()) as buffer:
        print_run_summary(again)
    printed = buffer.getvalue()
    utility_row = next(line for line in printed.splitlines() if line.startswith("model_utility"))
    assert utility_row.split()[-1] == "-" and utility_row.split()[1] != "-"
    assert "retain reference: light evaluation" in printed


def test_resume_after_a_failure_inside_unlearn(prefect_api, workspace):
    paths, root = workspace
    with pytest.raises(Exception, match="step 2"):
        run_flow(paths + ["unlearn.lr=2e-3", "run.fail_at_unlearn_step=2"])
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    assert runs["status"].iloc[-1] == "failed"
    resumed = run_flow(paths + ["unlearn.lr=2e-3"])
    for label in (*UPSTREAM, "threshold_mask"):
        assert resumed["states"][label] == "Cached"
    assert resumed["states"]["unlearn"] == "Completed"


def test_corrupted_artifact_is_recomputed_not_used(prefect_api, workspace):
    paths, root = workspace
    mask_files = list((root / "store" / "threshold_mask").glob("*/mask.parquet"))
    assert mask_files
    for path in mask_files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    rerun = run_flow(paths)
    assert rerun["states"]["threshold_mask"] == "Completed"
    assert rerun["states"]["train_target"] == "Cached"


def test_code_version_change_invalidates_stage_and_followers(prefect_api, workspace, monkeypatch):
    import flows.pipeline as pipeline

    paths, _ = workspace
    original = pipeline.stage_code_version
    monkeypatch.setattr(pipeline, "stage_code_version",
                        lambda stage: original(stage) + ("-edited" if stage == "unlearn" else ""))
    rerun = run_flow(paths)
    for label in (*UPSTREAM, "threshold_mask", "evaluate_reference", "evaluate_target"):
        assert rerun["states"][label] == "Cached", label
    assert rerun["states"]["unlearn"] == "Completed"
    assert rerun["states"]["evaluate"] == "Completed"


def test_concurrent_runs_compute_shared_stages_once(prefect_api, tmp_path, monkeypatch):
    from simu_core import stages

    calls: dict[str, int] = {}
    lock = threading.Lock()
    for name in ("prepare_data", "train_model", "attribute"):
        original = getattr(stages, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            with lock:
                calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(stages, name, counting)
    paths = [f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"]
    outcomes: dict[float, dict] = {}

    def one(threshold):
        outcomes[threshold] = run_flow(paths + [f"mask.threshold={threshold}"])

    threads = [threading.Thread(target=one, args=(t,)) for t in (0.3, 0.6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(outcomes) == {0.3, 0.6}
    assert calls == {"prepare_data": 1, "train_model": 2, "attribute": 2}


def test_prefect_yaml_parses_and_entrypoints_validate():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    assert len(deployments) >= 2
    assert any(deployment.get("schedules") for deployment in deployments)
    for deployment in deployments:
        flow = load_flow_from_entrypoint(str(PROJECT_ROOT / deployment["entrypoint"]))
        flow.validate_parameters(deployment.get("parameters") or {})
        for schedule in deployment.get("schedules") or []:
            assert schedule.get("cron")
            flow.validate_parameters({**(deployment.get("parameters") or {}), **(schedule.get("parameters") or {})})


def test_cli_rejects_invalid_config_before_any_stage(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--set", "mask.threshold=2", "--set", f"run.store={tmp_path / 's'}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "mask.threshold" in result.stderr and "less than or equal to 1" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.benchmark=tofu", "data.source=/nonexistent/tofu"], "data.source: folder '/nonexistent/tofu' does not exist"),
        (["model.base=./no-such-model"], "model.base: local path './no-such-model' does not exist"),
    ],
)
def test_cli_rejects_missing_inputs_before_any_stage(tmp_path, overrides, message):
    arguments = [item for override in overrides for item in ("--set", override)]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *arguments, "--set", f"run.store={tmp_path / 's'}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "s").exists()


def test_preflight_names_missing_tofu_files(tmp_path):
    from simu_core.config import load_config
    from simu_core.preflight import PreflightError, check_inputs

    (tmp_path / "forget01.json").write_text("{}\n")
    config = load_config(overrides=["data.benchmark=tofu", "data.split=forget01", f"data.source={tmp_path}"])
    with pytest.raises(PreflightError, match="retain99.json"):
        check_inputs(config)


def test_lume_run_with_a_given_target(prefect_api, tmp_path):
    from conftest import LUME_DIR, require_dir
    from simu_core.data import load_lume
    from simu_core.models.tiny import build_tiny_llama, save_model, train_tokenizer
    from simu_core.config import TinyModelConfig

    lume = load_lume(require_dir(LUME_DIR))
    texts = list(lume.rows["input"].head(200)) + list(lume.rows["output"].head(200))
    tokenizer = train_tokenizer(texts, 400)
    model = build_tiny_llama(TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4),
                             tokenizer, 64, seed=0)
    save_model(model, tokenizer, tmp_path / "target")
    from flows.pipeline import simu_pipeline

    summary = simu_pipeline(overrides=[
        "data.benchmark=lume", f"data.source={LUME_DIR}", f"model.target={tmp_path / 'target'}",
        "model.max_length=48", "attribution.max_items=2", "unlearn.max_steps=1", "unlearn.batch_size=2",
        "unlearn.stop_at=null", "eval.max_items=1", "eval.max_new_tokens=4", f"run.store={tmp_path / 'store'}",
        f"run.results={tmp_path / 'results'}",
    ])
    assert "train_retain_reference" not in summary["states"] and summary["states"]["unlearn"] == "Completed"
    assert "task_aggregate" in summary["metrics"] and "mia_score" in summary["metrics"]
    assert "final_score" not in summary["metrics"]  # no MMLU given: not computed, never made up
