"""``simu eval``: a model folder (and a reference) evaluated through cached stages, no unlearning."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest

EVAL_OVERRIDES = [
    "data.num_authors=10", "data.holdout_authors=1", "data.general_facts=4", "model.max_length=64",
    "eval.max_items=4", "eval.max_new_tokens=4", "eval.batch_size=8",
]


def _save_tiny_model(folder: Path, seed: int) -> Path:
    """A random 1-layer Llama with a tokenizer trained on the small synthetic benchmark."""
    from simu_core.config import TinyModelConfig, load_config
    from simu_core.data import load_benchmark
    from simu_core.models.tiny import build_tiny_llama, save_model, train_tokenizer

    benchmark = load_benchmark(load_config(overrides=EVAL_OVERRIDES).data)
    tokenizer = train_tokenizer(benchmark.corpus(), 300)
    model = build_tiny_llama(TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4),
                             tokenizer, 64, seed=seed)
    return save_model(model, tokenizer, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    return _save_tiny_model(root / "model", 0), _save_tiny_model(root / "reference", 1)


def _eval_args(model, reference, root, *extra):
    from flows.cli import build_parser

    arguments = ["eval", "--model", str(model)] + (["--reference", str(reference)] if reference else [])
    for override in [*EVAL_OVERRIDES, f"run.store={root / 'store'}", f"run.results={root / 'results'}", *extra]:
        arguments += ["--set", override]
    return build_parser().parse_args(arguments)


def test_eval_command_cached_stages_outputs_and_content_key(prefect_api, models, tmp_path):
    from flows.cli import command_eval
    from flows.evaluate import simu_eval
    from simu_core import reporting

    model, reference = models
    # Not capsys: Prefect's log handlers would keep its stream after the test.
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert command_eval(_eval_args(model, reference, tmp_path)) == 0
    printed = stdout.getvalue()
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "model", "reference"], printed
    assert "forget_quality" in printed and "results:" in printed

    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    row = runs.iloc[-1]
    assert (row["kind"], row["status"]) == ("eval", "completed")
    assert row["config.model.target"] == str(model) and row["config.model.retain_reference"] == str(reference)
    assert pd.notna(row["forget_quality"]) and pd.notna(row["model_utility"])
    assert row["state.evaluate_target"] == "Completed" and row["state.evaluate_reference"] == "Completed"
    assert "state.unlearn" not in runs.columns and "state.attribute_forget" not in runs.columns
    run_dir = tmp_path / "results" / "runs" / row["run_id"]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert set(metrics["model"]) == {"target", "reference"}
    assert (run_dir / "items.parquet").exists() and (run_dir / "config.yaml").exists()
    with pytest.raises(ValueError, match="no completed run"):
        reporting.read_runs(tmp_path / "results")  # eval rows are not pipeline runs to compare

    overrides = [*EVAL_OVERRIDES, f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"]
    again = simu_eval(model=str(model), reference=str(reference), overrides=overrides)
    assert set(again["states"].values()) == {"Cached"}, again["states"]

    # The same folder with other weights: a new model, evaluated again; the reference stays cached.
    _save_tiny_model(model, 2)
    changed = simu_eval(model=str(model), reference=str(reference), overrides=overrides)
    assert changed["states"]["evaluate_target"] == "Completed", changed["states"]
    assert changed["states"]["evaluate_reference"] == "Cached", changed["states"]
    assert changed["metrics"]["forget_prob"] != again["metrics"]["forget_prob"]


def test_eval_without_reference_reports_forget_quality_as_not_computed(prefect_api, models, tmp_path):
    from flows.evaluate import simu_eval

    summary = simu_eval(model=str(models[0]), overrides=[
        *EVAL_OVERRIDES, f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"])
    assert "evaluate_reference" not in summary["states"]
    assert "forget_quality" not in summary["metrics"] and "model_utility" in summary["metrics"]


@pytest.mark.parametrize("kind, message", [
    ("missing", "--model: folder"), ("empty", "holds no Hugging Face model (no config.json)"), ("file", "is a file"),
])
def test_eval_rejects_bad_model_before_any_stage(tmp_path, capsys, kind, message):
    from flows.cli import command_eval

    path = tmp_path / kind
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"")
    assert command_eval(_eval_args(path, None, tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_eval_refuses_the_model_as_an_override(tmp_path, models, capsys):
    from flows.cli import command_eval

    assert command_eval(_eval_args(models[0], None, tmp_path, f"model.retain_reference={models[1]}")) == 2
    assert "--reference" in capsys.readouterr().err
