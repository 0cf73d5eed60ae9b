"""scripts/why_forget_quality.py on a hand-made results folder: two runs, four forget items with
known per-token NLLs, every figure checked against a hand computation (no model, pandas only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import load_script



@pytest.fixture(scope="module")
def why():
    return load_script("why_forget_quality")


# Per item i = 0..3 (per-token NLLs; log R = nll_paraphrased - mean(nll_perturbed)):
TARGET = {"nll": [0.1] * 4, "para": [1.0] * 4, "pert": [[2.0, 2.0]] * 4}  # log R = -1 for every item
REFERENCE = {"nll": [1.0, 1.5, 2.0, 2.5], "para": [2.0] * 4,  # perturbed means 2.2, 2.0, 1.8, 1.6
             "pert": [[2.1, 2.3], [2.0, 2.0], [1.6, 2.0], [1.6, 1.6]]}  # log R = -0.2, 0, 0.2, 0.4
SIMU = {"nll": [1.1, 2.1, 3.1, 4.1], "para": [1.5] * 4,  # perturbed means 2.4, 3.0, 3.5, 4.0
        "pert": [[2.4, 2.4], [2.5, 3.5], [3.5, 3.5], [4.0, 4.0]]}  # log R = -0.9, -1.5, -2.0, -2.5


def _items(unlearned: dict) -> pd.DataFrame:
    rows = []
    for model, values in (("unlearned", unlearned), ("target", TARGET), ("reference", REFERENCE)):
        for i in range(4):
            rows.append({"item_id": f"forget-{i}", "split": "forget", "model": model, "num_tokens": 10,
                         "nll": values["nll"][i], "probability": math.exp(-values["nll"][i]),
                         "nll_paraphrased": values["para"][i], "nll_perturbed": list(values["pert"][i]),
                         "truth_ratio": math.exp(values["para"][i] - np.mean(values["pert"][i]))})
    # A retain row the analysis must ignore.
    rows.append({"item_id": "retain-0", "split": "retain_eval", "model": "unlearned", "num_tokens": 5, "nll": 9.0,
                 "probability": math.exp(-9.0), "nll_paraphrased": np.nan, "nll_perturbed": [9.0],
                 "truth_ratio": 1.0})
    return pd.DataFrame(rows)


def _run(run_id: str, method: str, status: str, unlearned: dict, fq: float, time: int) -> dict:
    return {"run_id": run_id, "status": "completed", "kind": "run", "time": time, "config_hash": run_id,
            "config.unlearn.method": method, "config.mask.rule": "layer_relative",
            "config.unlearn.train_attention": True, "config.unlearn.lr": 1e-4, "config.model.finetune.seed": 0,
            "config.run.seed": 0, "forget_prob": float(np.mean(np.exp(-np.array(unlearned["nll"])))),
            "forget_quality": fq, "stop.status": status}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    # simu: every unlearned R below every reference R: KS D = 1, exact p = 2 / C(8, 4).
    # so_graddiff: the reference's own numbers (D = 0, p = 1); it did not stop as matched.
    runs = [_run("run-simu", "simu", "matched", SIMU, 2 / 70, 1),
            _run("run-so", "so_graddiff", "not_reached", REFERENCE, 1.0, 2)]
    pd.DataFrame(runs).to_parquet(tmp_path / "runs.parquet")
    for run_id, unlearned in (("run-simu", SIMU), ("run-so", REFERENCE)):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        _items(unlearned).to_parquet(tmp_path / "runs" / run_id / "items.parquet")
    return tmp_path


def test_matched_reading_by_hand(why, results: Path, capsys):
    assert why.main(["--results", str(results)]) == 0
    printed = capsys.readouterr()
    assert "note:" not in printed.err  # recorded FQ equals the items' KS p-value
    table = pd.read_csv(results / "report" / "why_forget_quality.csv").set_index("curve")
    assert list(table.index) == ["simu", why.TARGET_ROW, why.REFERENCE_ROW]  # so_graddiff not matched
    simu = table.loc["simu"]
    log_r = np.array([-0.9, -1.5, -2.0, -2.5])
    assert simu["n"] == 1
    assert simu["forget_prob_mean"] == pytest.approx(np.mean(np.exp(-np.array([1.1, 2.1, 3.1, 4.1]))))
    assert simu["ks_d_mean"] == pytest.approx(1.0)
    assert simu["forget_quality_mean"] == pytest.approx(2 / 70)
    assert simu["tr_score_mean"] == pytest.approx(np.mean(np.exp(log_r)))  # every R < 1: min(R, 1/R) = R
    assert simu["median_log_r_mean"] == pytest.approx(-1.75)
    assert simu["iqr_log_r_mean"] == pytest.approx((-1.5 + 0.25 * 0.6) - (-2.5 + 0.75 * 0.5))
    assert simu["above_ref_median_mean"] == 0.0  # reference median log R 0.1
    # Changes of per-token log-prob (= -nll), unlearned - target.
    assert simu["d_answer_mean"] == pytest.approx(-2.5)  # -(1, 2, 3, 4)
    assert simu["d_para_mean"] == pytest.approx(-0.5)
    assert simu["d_pert_mean"] == pytest.approx(-1.225)  # -(0.4, 1.0, 1.5, 2.0)
    assert simu["d_log_r_mean"] == pytest.approx(-1.225 + 0.5)  # Δ perturbed - Δ paraphrased
    assert simu["rho_answer_pert_mean"] == pytest.approx(1.0)
    assert np.isnan(simu["rho_answer_para_mean"])  # Δ paraphrased constant
    assert simu["pert_over_answer_mean"] == pytest.approx(1.225 / 2.5)
    assert simu["log_r_rose_mean"] == pytest.approx(0.25)  # only item 0: -0.9 > -1
    target = table.loc[why.TARGET_ROW]
    assert target["median_log_r_mean"] == pytest.approx(-1.0) and target["ks_d_mean"] == pytest.approx(1.0)
    assert np.isnan(target["d_answer_mean"])
    reference = table.loc[why.REFERENCE_ROW]
    assert reference["ks_d_mean"] == 0.0 and reference["forget_quality_mean"] == pytest.approx(1.0)
    assert reference["median_log_r_mean"] == pytest.approx(0.1)
    assert reference["d_answer_mean"] == pytest.approx(-1.65)  # -(0.9, 1.4, 1.9, 2.4)
    assert reference["d_para_mean"] == pytest.approx(-1.0)
    assert reference["d_pert_mean"] == pytest.approx(0.1)  # (-0.2, 0, 0.2, 0.4)
    assert reference["d_log_r_mean"] == pytest.approx(1.1)
    assert reference["rho_answer_pert_mean"] == pytest.approx(-1.0)
    # The printed Markdown carries the same figures.
    assert "| simu | 1 | 0.129 | 0.0286 | 1 |" in printed.out
    assert "| simu | 1 | -2.5 | -0.5 | -1.23 | -0.725 |" in printed.out
    items = pd.read_csv(results / "report" / "why_forget_quality_items.csv")
    assert len(items) == 4 and set(items["run_id"]) == {"run-simu"}
    assert items.sort_values("item_id")["d_answer"].tolist() == pytest.approx([-1.0, -2.0, -3.0, -4.0])


def test_all_runs_and_out_folder(why, results: Path, tmp_path: Path, capsys):
    out = tmp_path / "elsewhere"
    assert why.main(["--results", str(results), "--all", "--out", str(out)]) == 0
    capsys.readouterr()
    table = pd.read_csv(out / "why_forget_quality.csv").set_index("curve")
    assert list(table.index) == ["simu", "so_graddiff", why.TARGET_ROW, why.REFERENCE_ROW]
    so = table.loc["so_graddiff"]  # unlearned = reference: the reference row's figures, D = 0
    assert so["ks_d_mean"] == 0.0 and so["forget_quality_mean"] == pytest.approx(1.0)
    for stat in ("d_answer", "d_para", "d_pert", "d_log_r", "tr_score", "median_log_r"):
        assert so[f"{stat}_mean"] == pytest.approx(table.loc[why.REFERENCE_ROW, f"{stat}_mean"])
    assert len(pd.read_csv(out / "why_forget_quality_items.csv")) == 8  # 2 runs x 4 forget items


def test_clear_errors(why, results: Path, tmp_path: Path, capsys):
    assert why.main(["--results", str(tmp_path / "missing")]) == 1
    assert "no runs table" in capsys.readouterr().err
    for run_id in ("run-simu", "run-so"):
        (results / "runs" / run_id / "items.parquet").unlink()
    assert why.main(["--results", str(results), "--all"]) == 1
    assert "items.parquet" in capsys.readouterr().err
