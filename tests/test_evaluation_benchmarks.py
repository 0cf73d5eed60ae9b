"""The TOFU and LUME suites on the real shared files, with tiny models built here (untrained)."""

from __future__ import annotations

import math
import string

import pandas as pd
import pytest
import torch

from conftest import LUME_DIR, TOFU_DIR, require_dir
from simu_core.config import EvalConfig, TinyModelConfig
from simu_core.data import load_lume, load_tofu
from simu_core.data.lume import LumeBenchmark
from simu_core.evaluation import (
    QA_HEADLINE_METRICS,
    MMLUFormatError,
    evaluate_lume,
    evaluate_mmlu,
    evaluate_qa,
    load_mmlu,
)
from simu_core.metrics import MODEL_UTILITY_COMPONENTS
from simu_core.metrics.rouge import rouge_l_recall
from simu_core.models.tiny import build_tiny_llama, train_tokenizer

SHAPE = TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, vocab_size=400)
MAX_LENGTH = 512


def _tiny(texts, seed=0):
    tokenizer = train_tokenizer(texts, SHAPE.vocab_size)
    return build_tiny_llama(SHAPE, tokenizer, MAX_LENGTH, seed=seed).eval(), tokenizer


# ---------------------------------------------------------------- TOFU


@pytest.fixture(scope="module")
def tofu():
    return load_tofu("forget01", require_dir(TOFU_DIR), retain_authors=1)


def test_tofu_suite_on_the_real_files(tofu, tmp_path):
    model, tokenizer = _tiny(tofu.corpus())
    reference_model = build_tiny_llama(SHAPE, tokenizer, MAX_LENGTH, seed=1).eval()
    config = EvalConfig(max_items=4, max_new_tokens=4, batch_size=32)
    reference = evaluate_qa(reference_model, tokenizer, tofu, config, max_length=MAX_LENGTH)
    reference.save(tmp_path / "reference")
    result = evaluate_qa(
        model, tokenizer, tofu, config, pd.read_parquet(tmp_path / "reference" / "items.parquet"), max_length=MAX_LENGTH
    )
    headline = result.headline()
    for name in (*QA_HEADLINE_METRICS, *MODEL_UTILITY_COMPONENTS):
        assert name in headline and math.isfinite(headline[name]), name
    assert headline["forget_quality_computed"] == 1.0 and headline["privleak_computed"] == 1.0
    assert 0.0 <= headline["forget_quality"] <= 1.0 and 0.0 <= headline["model_utility"] <= 1.0

    items = result.items
    assert items.groupby("split").size().to_dict() == {
        "forget": 4, "retain_eval": 4, "real_authors": 4, "world_facts": 4, "holdout": 4
    }
    assert items["item_id"].iloc[0] == "forget-0"
    forget = items[items["split"] == "forget"]
    assert forget["nll_perturbed"].map(len).eq(5).all()
    assert items[items["split"] == "real_authors"]["nll_perturbed"].map(len).eq(3).all()
    # Per-item truth ratio R = exp(nll_paraphrased - mean nll_perturbed), as stored.
    row = forget.iloc[0]
    assert math.isclose(row["truth_ratio"], math.exp(row["nll_paraphrased"] - sum(row["nll_perturbed"]) / 5), rel_tol=1e-9)
    assert items[items["split"] == "holdout"]["generation"].isna().all()
    assert forget["generation"].map(lambda text: isinstance(text, str)).all()

    result.save(tmp_path / "model")
    metrics = pd.read_parquet(tmp_path / "model" / "metrics.parquet")
    assert set(metrics["benchmark"]) == {"tofu"}
    assert metrics[(metrics["split"] == "all") & (metrics["metric"] == "forget_quality")]["value"].item() == pytest.approx(
        headline["forget_quality"]
    )
    assert len(pd.read_parquet(tmp_path / "model" / "items.parquet")) == 20

    # Without the reference: not computed, never made up.
    alone = evaluate_qa(model, tokenizer, tofu, config, max_length=MAX_LENGTH)
    assert "forget_quality" not in alone.headline() and "privleak" not in alone.headline()
    assert alone.value("forget_quality_computed") == 0.0
    assert any("not computed" in note for note in alone.notes)
    with pytest.raises(KeyError, match="not computed"):
        alone.value("forget_quality")


# ---------------------------------------------------------------- LUME


@pytest.fixture(scope="module")
def lume_subset():
    full = load_lume(require_dir(LUME_DIR))
    # Two rows per (split, task, kind) cell and three documents per MIA set: every cell is present.
    rows = full.rows.groupby(["split", "task", "kind"], sort=False).head(2).reset_index(drop=True)
    return LumeBenchmark(rows=rows, mia_member=full.mia_member.head(3), mia_nonmember=full.mia_nonmember.head(3))


@pytest.fixture(scope="module")
def lume_model(lume_subset):
    texts = [*lume_subset.rows["input"], *lume_subset.rows["output"], *lume_subset.mia_member["document"],
             *lume_subset.mia_nonmember["document"]]
    # Enough " A" .. " D" for BPE to merge each letter with its space: one token per MMLU option.
    texts += ["Answer: A B C D"] * 50
    return _tiny(texts)


def _mmlu_folder(root):
    """A hand-made cais/mmlu-layout folder: two subjects, gold answers A, B, A, C."""
    data = {
        "astronomy": [("Which planet is red?", ["Mars", "Venus", "Earth", "Jupiter"], 0),
                      ("Which is a star?", ["Moon", "Sun", "Earth", "Mars"], 1)],
        "virology": [("What is a virus?", ["A pathogen", "A plant", "A rock", "A star"], 0),
                     ("Which is an RNA virus?", ["Smallpox", "Herpes", "Influenza", "HPV"], 2)],
    }
    for subject, questions in data.items():
        folder = root / subject
        folder.mkdir(parents=True)
        pd.DataFrame(
            {"question": [q for q, _, _ in questions], "subject": subject,
             "choices": [c for _, c, _ in questions], "answer": [a for _, _, a in questions]}
        ).to_parquet(folder / "test-00000-of-00001.parquet", index=False)
        # Dev files must be ignored.
        pd.DataFrame({"question": ["dev?"], "subject": subject, "choices": [["a", "b", "c", "d"]], "answer": [3]}).to_parquet(
            folder / "dev-00000-of-00001.parquet", index=False
        )
    return root


def test_lume_suite_without_mmlu(lume_subset, lume_model, tmp_path):
    model, tokenizer = lume_model
    config = EvalConfig(max_new_tokens=6, batch_size=32)
    result = evaluate_lume(model, tokenizer, lume_subset, config, mmlu=None, max_length=MAX_LENGTH)
    headline = result.headline()
    assert "final_score" not in headline and "mmlu" not in headline
    assert headline["final_score_computed"] == 0.0 and headline["mmlu_computed"] == 0.0
    assert headline["task_aggregate_computed"] == 1.0 and 0.0 <= headline["task_aggregate"] <= 1.0
    assert 0.0 <= headline["mia_score"] <= 1.0 and 0.0 <= headline["mia_auc"] <= 1.0
    assert any("mmlu and final_score not computed" in note for note in result.notes)
    metrics = result.metrics
    for split in ("forget", "retain"):
        names = set(metrics[metrics["split"] == split]["metric"])
        assert {f"{kind}_{task}" for kind in ("regurgitation", "knowledge") for task in ("Task1", "Task2", "Task3")} <= names
    items = result.items
    assert items.groupby("split").size().to_dict() == {"forget": 12, "retain": 12, "mia_member": 3, "mia_nonmember": 3}
    assert items[items["split"].str.startswith("mia")]["nll"].gt(0).all()
    completions = items[items["kind"] == "completion"]
    assert completions["score"].between(0, 1).all()
    result.save(tmp_path)
    assert len(pd.read_parquet(tmp_path / "items.parquet")) == 30


def test_lume_final_score_with_a_hand_made_mmlu(lume_subset, lume_model, tmp_path):
    model, tokenizer = lume_model
    letters = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"] for letter in "ABCD"]
    assert len({len(ids) for ids in letters}) == 1  # equal lengths: uniform logits tie on every option
    flat = build_tiny_llama(SHAPE, tokenizer, MAX_LENGTH, seed=0).eval()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    # Zero logits: every token has probability 1/V, generations are empty. Hand-computed: task
    # aggregate 0 (retain scores 0), document NLL log V, MMLU picks A on each question (ties go to
    # the first option) -> 2 of 4 right = 0.5; final = (0 + MIA score + 0.5) / 3. (The MIA score
    # itself rests on float ties between equal NLLs, so it is read back, not asserted.)
    folder = _mmlu_folder(tmp_path / "mmlu")
    result = evaluate_lume(flat, tokenizer, lume_subset, EvalConfig(max_new_tokens=4), mmlu=folder, max_length=MAX_LENGTH)
    documents = result.items[result.items["split"].str.startswith("mia")]
    assert documents["nll"].to_numpy() == pytest.approx(math.log(len(tokenizer)), rel=1e-5)
    assert result.value("task_aggregate") == 0.0
    assert result.value("mmlu") == 0.5
    assert result.value("final_score") == pytest.approx((0.0 + result.value("mia_score") + 0.5) / 3)
    assert result.value("final_score_computed") == 1.0 and result.value("mmlu_computed") == 1.0
    assert result.value("mmlu_below_threshold") == 0.0  # 0.5 >= 0.371
    mmlu_items = result.items[result.items["split"] == "mmlu"]
    assert list(mmlu_items["reference"]) == ["A", "B", "A", "C"] and set(mmlu_items["generation"]) == {"A"}
    # A real model on the same folder gives an accuracy in [0, 1] over the 4 test questions.
    predictions = evaluate_mmlu(model, tokenizer, load_mmlu(folder))
    assert len(predictions) == 4 and predictions["correct"].between(0, 1).all()


def test_lume_warns_and_flags_mmlu_below_the_official_threshold(lume_subset, lume_model, tmp_path):
    _, tokenizer = lume_model
    flat = build_tiny_llama(SHAPE, tokenizer, MAX_LENGTH, seed=0).eval()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    folder = _mmlu_folder(tmp_path / "mmlu")
    # Shift every gold answer by one option: the flat model (always A) now gets none right.
    for path in folder.glob("*/test-*.parquet"):
        frame = pd.read_parquet(path)
        frame["answer"] = (frame["answer"] + 1) % 4
        frame.to_parquet(path, index=False)
    with pytest.warns(UserWarning, match="below the task's threshold 0.371"):
        result = evaluate_lume(flat, tokenizer, lume_subset, EvalConfig(max_new_tokens=2), mmlu=folder,
                               max_length=MAX_LENGTH)
    assert result.value("mmlu") == 0.0
    assert result.value("mmlu_below_threshold") == 1.0
    assert any("0.371" in note for note in result.notes)
    # Empty generations are scored as the official scorer reads them back from CSV: as "nan".
    completions = result.items[result.items["kind"] == "completion"]
    assert (completions["generation"] == "").all()
    expected = [rouge_l_recall("nan", gold) for gold in completions["reference"]]
    assert list(completions["score"]) == expected


def test_mmlu_layouts_and_errors(tmp_path):
    csv_folder = tmp_path / "hendrycks" / "test"
    csv_folder.mkdir(parents=True)
    pd.DataFrame([["2+2?", "3", "4", "5", "6", "B"], ["1+1?", "2", "3", "4", "5", "A"]]).to_csv(
        csv_folder / "elementary_mathematics_test.csv", header=False, index=False
    )
    data = load_mmlu(tmp_path / "hendrycks")
    assert list(data["answer"]) == [1, 0] and data["subject"].unique().tolist() == ["elementary_mathematics"]
    assert data["choices"].iloc[0] == ["3", "4", "5", "6"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMLUFormatError, match="no MMLU test files"):
        load_mmlu(tmp_path / "empty")
    with pytest.raises(MMLUFormatError, match="does not exist"):
        load_mmlu(tmp_path / "absent")
    bad = tmp_path / "bad" / "law"
    bad.mkdir(parents=True)
    pd.DataFrame({"question": ["q"], "choices": [["a", "b"]], "answer": [string.ascii_uppercase.index("E")]}).to_parquet(
        bad / "test-0.parquet", index=False
    )
    with pytest.raises(MMLUFormatError, match="row 0 has answer 4"):
        load_mmlu(tmp_path / "bad")


def test_lume_rows_missing_fields_are_clear_errors(lume_subset, lume_model):
    model, tokenizer = lume_model
    config = EvalConfig(max_new_tokens=2)
    no_output = LumeBenchmark(lume_subset.rows.drop(columns=["output"]), lume_subset.mia_member, lume_subset.mia_nonmember)
    with pytest.raises(ValueError, match=r"LUME rows lack field\(s\) \['output'\]"):
        evaluate_lume(model, tokenizer, no_output, config)
    no_document = LumeBenchmark(lume_subset.rows, lume_subset.mia_member.drop(columns=["document"]), lume_subset.mia_nonmember)
    with pytest.raises(ValueError, match=r"mia_member documents lack field\(s\) \['document'\]"):
        evaluate_lume(model, tokenizer, no_document, config)
    empty = LumeBenchmark(lume_subset.rows.iloc[:0], lume_subset.mia_member, lume_subset.mia_nonmember)
    with pytest.raises(ValueError, match="LUME rows are empty"):
        evaluate_lume(model, tokenizer, empty, config)
    rows = lume_subset.rows.copy()
    rows.loc[0, "task"] = "Task9"
    with pytest.raises(ValueError, match=r"unknown task value\(s\) \['Task9'\]"):
        evaluate_lume(model, tokenizer, LumeBenchmark(rows, lume_subset.mia_member, lume_subset.mia_nonmember), config)


def test_stage_evaluate_on_lume_with_mmlu_source(lume_subset, lume_model, tmp_path):
    from simu_core.config import load_config
    from simu_core.models.tiny import save_model
    from simu_core.stages import BENCHMARK_DIR, MODEL_DIR, evaluate

    model, tokenizer = lume_model
    benchmark_dir = tmp_path / "data" / BENCHMARK_DIR
    benchmark_dir.mkdir(parents=True)
    lume_subset.rows.to_parquet(benchmark_dir / "rows.parquet", index=False)
    lume_subset.mia_member.to_parquet(benchmark_dir / "mia_member.parquet", index=False)
    lume_subset.mia_nonmember.to_parquet(benchmark_dir / "mia_nonmember.parquet", index=False)
    save_model(model, tokenizer, tmp_path / "target" / MODEL_DIR)
    folder = _mmlu_folder(tmp_path / "mmlu")
    config = load_config(overrides=[
        "data.benchmark=lume", f"model.target={tmp_path / 'target'}", "eval.max_new_tokens=3",
        f"eval.mmlu_source={folder}",
    ])
    headline = evaluate(config, tmp_path / "data", tmp_path / "target", tmp_path / "eval")
    assert headline["final_score_computed"] == 1.0
    assert headline["final_score"] == pytest.approx((headline["task_aggregate"] + headline["mia_score"] + headline["mmlu"]) / 3)
    metrics = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    assert set(metrics["benchmark"]) == {"lume"} and (metrics["metric"] == "final_score").sum() == 1
    assert len(pd.read_parquet(tmp_path / "eval" / "items.parquet")) == 24 + 6 + 4
