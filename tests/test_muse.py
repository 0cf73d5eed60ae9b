"""MUSE: loader (real local folder, hub layout, errors), metrics (hand-computed values) and the
evaluation on tiny models built here (MUSE's prompt format, Min-K% against a plain forward pass)."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import require_dir
from simu_core.config import TinyModelConfig
from simu_core.data.jsonl import DataFileError
from simu_core.data.muse import MUSE_CORPORA, MUSE_HUB_IDS, MuseBenchmark, load_muse
from simu_core.evaluation import muse as muse_eval
from simu_core.evaluation.muse import (
    HEADLINE_METRICS,
    cut_knowmem_answer,
    evaluate_muse,
    knowmem_prompt,
    verbmem_reference,
)
from simu_core.metrics import mia
from simu_core.metrics import muse as metrics
from simu_core.metrics.rouge import rouge_scores
from simu_core.models.tiny import build_tiny_llama, train_tokenizer
from simu_core.paths import SHARED_DATA_DIR

MUSE_NEWS_DIR = SHARED_DATA_DIR / "muse" / "news"
SHAPE = TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, vocab_size=300)


# ---------------------------------------------------------------- a hand-made folder


def _rows():
    """Small MUSE files in the benchmark's local layout (MUSE repository names)."""
    return {
        "raw/forget.json": ["The mayor opened the bridge on Monday.", "Rain closed the harbour."],
        "raw/retain1.json": ["The council met on Tuesday.", "Schools reopened after the storm."],
        "verbmem/forget.json": [
            {"prompt": "The mayor opened the", "gt": "bridge on Monday morning."},
            {"prompt": "Rain closed the", "gt": "harbour for two days."},
        ],
        "knowmem/forget_qa.json": [
            {"question": "Who opened the bridge?", "answer": "The mayor"},
            {"question": "What closed the harbour?", "answer": "Rain"},
        ],
        "knowmem/retain2_qa.json": [{"question": "When did the council meet?", "answer": "Tuesday"}],
        "knowmem/forget_qa_icl.json": [
            {"question": "What colour is the sky?", "answer": "Blue"},
            {"question": "How many legs has a cat?", "answer": "Four"},
        ],
        "knowmem/retain2_qa_icl.json": [{"question": "What is two plus two?", "answer": "Four"}],
        "privleak/forget.json": ["The mayor opened the bridge on Monday morning in the rain.",
                                 "Rain closed the harbour for two days last week."],
        "privleak/holdout.json": ["A new library opened in the town centre yesterday.",
                                  "The football club signed a young striker on Friday."],
        "privleak/retain2.json": ["The council met on Tuesday to discuss the budget.",
                                  "Schools reopened after the storm passed over."],
    }


def _write(folder, rows=None):
    for name, content in (rows or _rows()).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content), encoding="utf-8")
    return folder


# ---------------------------------------------------------------- loader


def test_the_real_news_folder():
    folder = require_dir(MUSE_NEWS_DIR)
    bench = load_muse("news", folder, retain_split="privleak/retain2")
    assert bench.sizes() == {
        "forget_chunks": 889, "retain_chunks": 100, "privleak_forget": 100, "privleak_holdout": 100,
        "privleak_retain": 100, "verbmem_forget": 100, "knowmem_forget": 100, "knowmem_retain": 100,
        "knowmem_forget_icl": 10, "knowmem_retain_icl": 10,
        "forget": 888, "retain": 100,  # the texts unlearning reads: the empty chunk is skipped
    }
    assert bench.corpus_name == "news" and bench.retain_split == "privleak/retain2"
    assert bench.retain_chunks == bench.privleak_retain
    assert list(bench.verbmem_forget.columns) == ["item_id", "prompt", "gt"]
    assert list(bench.knowmem_retain.columns) == ["item_id", "question", "answer"]
    assert list(bench.knowmem_forget_icl.columns) == ["question", "answer"]
    assert bench.verbmem_forget["item_id"].iloc[0] == "verbmem_forget-0"
    # The published raw forget corpus holds one empty chunk; it is kept so the count stays 889.
    assert bench.forget_chunks[821] == "" and sum(not text for text in bench.forget_chunks) == 1
    # The local folder has no raw retain corpus: the default names the file and what is there.
    with pytest.raises(DataFileError, match=r"raw/retain1\.json.*retain corpora present here: \['privleak/retain2'\]"):
        load_muse("news", folder)
    assert load_muse("news", folder, retain_split=None).retain_chunks == []


def test_save_and_load_round_trip(tmp_path):
    bench = load_muse("news", _write(tmp_path / "src"))
    assert bench.retain_chunks == _rows()["raw/retain1.json"] and bench.retain_split == "retain1"
    bench.save(tmp_path / "saved")
    again = MuseBenchmark.load(tmp_path / "saved")
    assert again.sizes() == bench.sizes() and again.retain_split == "retain1"
    assert again.corpus() == bench.corpus()
    pd.testing.assert_frame_equal(again.knowmem_forget, bench.knowmem_forget)
    (tmp_path / "saved" / "knowmem_retain.parquet").unlink()
    with pytest.raises(DataFileError, match="knowmem_retain.parquet"):
        MuseBenchmark.load(tmp_path / "saved")


def test_hub_file_names_in_a_local_folder(tmp_path):
    """The reference code's load_data.py writes the hub split names (retain_qa, privleak/retain)."""
    rows = _rows()
    renames = {"knowmem/retain2_qa.json": "knowmem/retain_qa.json",
               "knowmem/retain2_qa_icl.json": "knowmem/retain_qa_icl.json",
               "privleak/retain2.json": "privleak/retain.json"}
    rows = {renames.get(name, name): content for name, content in rows.items()}
    bench = load_muse("books", _write(tmp_path, rows), retain_split="privleak/retain")
    assert bench.corpus_name == "books" and bench.retain_split == "privleak/retain2"
    assert bench.privleak_retain == bench.retain_chunks == _rows()["privleak/retain2.json"]
    assert list(bench.knowmem_retain["answer"]) == ["Tuesday"]


def test_hub_reads_the_hub_split_names(monkeypatch):
    rows = _rows()
    hub = {  # (subset, split) -> rows as datasets yields them
        ("raw", "forget"): [{"text": t} for t in rows["raw/forget.json"]],
        ("raw", "retain2"): [{"text": t} for t in rows["raw/retain1.json"]],
        ("verbmem", "forget"): rows["verbmem/forget.json"],
        ("knowmem", "forget_qa"): rows["knowmem/forget_qa.json"],
        ("knowmem", "retain_qa"): rows["knowmem/retain2_qa.json"],
        ("knowmem", "forget_qa_icl"): rows["knowmem/forget_qa_icl.json"],
        ("knowmem", "retain_qa_icl"): rows["knowmem/retain2_qa_icl.json"],
        ("privleak", "forget"): [{"text": t} for t in rows["privleak/forget.json"]],
        ("privleak", "holdout"): [{"text": t} for t in rows["privleak/holdout.json"]],
        ("privleak", "retain"): [{"text": t} for t in rows["privleak/retain2.json"]],
    }
    calls = []

    def fake_load_dataset(path, name, split, token=None):
        calls.append((path, name, split, token))
        if (name, split) not in hub:
            raise ValueError(f'Unknown split "{split}"')
        return [dict(row) for row in hub[(name, split)]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    bench = load_muse("news", retain_split="retain2", token="secret")
    assert {path for path, *_ in calls} == {MUSE_HUB_IDS["news"]} and all(call[3] == "secret" for call in calls)
    assert {(name, split) for _, name, split, _ in calls} == set(hub)
    assert bench.retain_chunks == rows["raw/retain1.json"]
    assert bench.privleak_retain == rows["privleak/retain2.json"]
    with pytest.raises(DataFileError, match=r"muse-bench/MUSE-News \(subset 'raw', split 'retain1'\).*Unknown split"):
        load_muse("news", retain_split="retain1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "verbmem/forget.json").unlink(), r"missing file 'verbmem/forget\.json'"),
        (lambda f: (f / "knowmem/retain2_qa.json").unlink(),
         r"missing file 'knowmem/retain2_qa\.json' \(or 'knowmem/retain_qa\.json'\)"),
        (lambda f: (f / "knowmem/forget_qa.json").write_text('[{"question": "q"'),
         r"forget_qa\.json: not valid JSON"),
        (lambda f: (f / "verbmem/forget.json").write_text(json.dumps([{"prompt": "p"}])),
         r"verbmem/forget\.json: row 0 lacks field\(s\) \['gt'\]"),
        (lambda f: (f / "knowmem/forget_qa.json").write_text(json.dumps([{"question": "q", "answer": " "}])),
         r"forget_qa\.json: row 0 field 'answer' must be a non-empty string"),
        (lambda f: (f / "privleak/holdout.json").write_text("[]"), r"privleak/holdout\.json: the list is empty"),
        (lambda f: (f / "privleak/forget.json").write_text('{"text": "x"}'), r"privleak/forget\.json: expected a JSON list"),
        (lambda f: (f / "raw/retain1.json").unlink(), r"missing file 'raw/retain1\.json'.*retain_split='retain1'"),
    ],
)
def test_missing_or_ill_formed_files_are_named(tmp_path, change, message):
    folder = _write(tmp_path)
    change(folder)
    with pytest.raises(DataFileError, match=message):
        load_muse("news", folder)


def test_unknown_corpus_retain_split_or_folder(tmp_path):
    with pytest.raises(DataFileError, match=r"unknown MUSE corpus 'bbc'; expected one of \['news', 'books'\]"):
        load_muse("bbc", tmp_path)
    assert MUSE_CORPORA == ("news", "books")
    with pytest.raises(DataFileError, match="unknown MUSE retain_split 'holdout'"):
        load_muse("news", _write(tmp_path), retain_split="holdout")
    with pytest.raises(DataFileError, match="does not exist"):
        load_muse("news", tmp_path / "absent")


# ---------------------------------------------------------------- metrics


def test_rouge_l_f1_by_hand_without_stemming():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 3/3, R = 3/6, F1 = 2PR/(P+R) = 2/3.
    assert metrics.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(
        {"rougeL_f1": 2 / 3, "rougeL_recall": 0.5}
    )
    # Lower-cased, punctuation dropped: "Paris." matches "paris".
    assert metrics.rouge_l("paris", "Paris.")["rougeL_f1"] == 1.0
    # MUSE does not stem; simu's TOFU scorer (use_stemmer=True) does.
    assert metrics.rouge_l("reports", "report")["rougeL_f1"] == 0.0
    assert rouge_scores("reports", "report")["rougeL_f1"] == 1.0
    # Two items: F1 1 and 2/3 -> mean 5/6.
    assert metrics.verbmem(["a b", "the cat sat"], ["a b", "the cat sat on the mat"]) == pytest.approx(5 / 6)
    assert metrics.knowmem(["", "x"], ["y", "x"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        metrics.knowmem(["a"], ["a", "b"])


def test_clean_up_tokenization_as_muse_decodes():
    assert metrics.clean_up_tokenization("I do n't know , he said .") == "I don't know, he said."


def test_min_k_by_hand_and_the_empty_case():
    # k = 0.4 of 5 tokens: int(2.0) = 2 lowest log-probs, -5 and -4: statistic 4.5.
    assert metrics.min_k_statistic([-1, -2, -3, -4, -5]) == pytest.approx(4.5)
    # 7 tokens: int(2.8) = 2 (floor, no rounding up).
    assert metrics.min_k_statistic([-1, -1, -1, -1, -1, -2, -6]) == pytest.approx(4.0)
    # 2 tokens: int(0.8) = 0; MUSE's mean of nothing is NaN, here an error (simu's mia uses max(1, .)).
    with pytest.raises(ValueError, match="at least 3 token log-probs"):
        metrics.min_k_statistic([-1, -2])
    assert mia.min_k_statistic([-1, -2]) == 2.0


def test_privleak_auc_orientation_and_formula():
    # Forget texts less surprising than holdout (a memorising model): MUSE's AUC is 0.
    assert metrics.privleak_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert metrics.privleak_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    # Pairs (f, h): (1,2) <, (1,3) <, (2,2) tie, (2,3) <: 0.5 / 4.
    assert metrics.privleak_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.125)
    # The opposite orientation of open-unlearning's mia_auc (simu's mia.auc).
    assert metrics.privleak_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(1 - mia.auc([1.0, 2.0], [2.0, 3.0]))
    assert metrics.privleak(0.2, 0.5) == pytest.approx(-60.0)
    news = metrics.MUSE_RETRAIN_PRIVLEAK_AUC["news"]
    assert metrics.privleak(0.6, news) == pytest.approx((0.6 - 0.4772) / 0.4772 * 100)
    with pytest.raises(ValueError, match="reference_auc must be > 0"):
        metrics.privleak(0.5, 0.0)


def test_knowmem_prompt_and_cut():
    icl = pd.DataFrame({"question": ["Q1?", "Q2?"], "answer": ["A1", "A2"]})
    assert knowmem_prompt("Q?", icl) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q?\nAnswer: "
    assert knowmem_prompt("Q?", []) == "Question: Q?\nAnswer: "
    assert cut_knowmem_answer("Paris\n\nQuestion: next") == "Paris"
    assert cut_knowmem_answer("London\nQuestion: next") == "London"
    assert cut_knowmem_answer(" Rome Question: x") == " Rome "
    assert cut_knowmem_answer("Berlin\nis big") == "Berlin\nis big"


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The hand-made benchmark and a tiny untrained Llama with a BPE tokenizer trained on it."""
    folder = _write(tmp_path_factory.mktemp("muse"))
    bench = load_muse("news", folder)
    tokenizer = train_tokenizer(bench.corpus() + ["Question: Answer:\n\n"] * 20, SHAPE.vocab_size)
    model = build_tiny_llama(SHAPE, tokenizer, 128, seed=0).eval()
    return bench, model, tokenizer


def _by_hand_min_k(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    lp = sorted(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
    count = int(len(lp) * 0.4)
    return -sum(lp[:count]) / count


def test_evaluation_prompts_are_muse_format_and_min_k_matches_a_forward_pass(small, monkeypatch):
    bench, model, tokenizer = small
    seen = []
    real = muse_eval.generate_greedy

    def recording(model_, tokenizer_, prompts, max_new_tokens, batch_size):
        seen.append(([list(p) for p in prompts], max_new_tokens))
        return real(model_, tokenizer_, prompts, max_new_tokens, batch_size)

    monkeypatch.setattr(muse_eval, "generate_greedy", recording)
    result = evaluate_muse(model, tokenizer, bench, batch_size=3, verbmem_max_new_tokens=5, knowmem_max_new_tokens=4)

    # 1) VerbMem: the raw prompt with BOS, 5 new tokens.
    verb_ids, verb_new = seen[0]
    assert verb_new == 5 and verb_ids == [tokenizer(p)["input_ids"] for p in bench.verbmem_forget["prompt"]]
    assert verb_ids[0][0] == tokenizer.bos_token_id
    # 2-3) KnowMem: MUSE's exact few-shot text, written out here by hand.
    expected_forget = [
        "Question: What colour is the sky?\nAnswer: Blue\n\nQuestion: How many legs has a cat?\nAnswer: Four\n\n"
        f"Question: {q}\nAnswer: " for q in ("Who opened the bridge?", "What closed the harbour?")
    ]
    expected_retain = ["Question: What is two plus two?\nAnswer: Four\n\nQuestion: When did the council meet?\nAnswer: "]
    assert seen[1] == ([tokenizer(p)["input_ids"] for p in expected_forget], 4)
    assert seen[2] == ([tokenizer(p)["input_ids"] for p in expected_retain], 4)
    assert list(result.knowmem["prompt"]) == expected_forget + expected_retain

    # Min-K% from a plain, unbatched forward pass.
    privleak = result.privleak
    texts = {"forget": bench.privleak_forget, "holdout": bench.privleak_holdout}
    for row in privleak.itertuples():
        text = texts[row.split][int(row.item_id.rsplit("-", 1)[1])]
        assert row.min_k == pytest.approx(_by_hand_min_k(model, tokenizer, text), abs=1e-6)
        assert row.num_tokens == len(tokenizer(text)["input_ids"]) - 1

    m = result.metrics
    assert set(m) == set(HEADLINE_METRICS)
    forget, holdout = (privleak.loc[privleak["split"] == s, "min_k"].to_numpy() for s in ("forget", "holdout"))
    assert m["privleak_auc"] == metrics.privleak_auc(forget, holdout)
    assert math.isnan(m["privleak"]) and any("reference_privleak_auc" in note for note in result.notes)
    assert m["verbmem_forget"] == pytest.approx(result.verbmem["rougeL_f1"].mean())
    # VerbMem's gold text is the first 5 tokens (BOS included) of gt, as MUSE cuts it.
    assert list(result.verbmem["reference"]) == [verbmem_reference(tokenizer, gt, 5) for gt in bench.verbmem_forget["gt"]]
    assert result.verbmem["reference"].iloc[0] == tokenizer.decode(
        tokenizer(bench.verbmem_forget["gt"].iloc[0])["input_ids"][:5], skip_special_tokens=True
    )

    with_reference = evaluate_muse(model, tokenizer, bench, reference_privleak_auc=0.5, max_items=1,
                                   verbmem_max_new_tokens=2, knowmem_max_new_tokens=2)
    assert len(with_reference.privleak) == 2 and len(with_reference.verbmem) == 1
    assert with_reference.metrics["privleak"] == pytest.approx((with_reference.metrics["privleak_auc"] - 0.5) / 0.5 * 100)
    table = with_reference.to_result()
    assert table.value("privleak_computed") == 1.0 and set(table.items["kind"]) == {"verbmem", "knowmem", "privleak"}


def test_knowmem_answers_are_cut_and_scored_as_muse(small, monkeypatch):
    bench, model, tokenizer = small
    canned = {
        5: ["bridge on Monday morning.", "nothing like it"],  # VerbMem
        4: ["The mayor\n\nQuestion: more", " rain\nQuestion: x", "Tuesday Question: y"],  # KnowMem
    }
    calls = []

    def fake(model_, tokenizer_, prompts, max_new_tokens, batch_size):
        calls.append(len(prompts))
        outputs = canned[max_new_tokens]
        return outputs[:2] if len(calls) == 2 else outputs[2:] if len(calls) == 3 else outputs

    monkeypatch.setattr(muse_eval, "generate_greedy", fake)
    result = evaluate_muse(model, tokenizer, bench, verbmem_max_new_tokens=5, knowmem_max_new_tokens=4)
    assert list(result.knowmem["generation"]) == ["The mayor", " rain", "Tuesday "]
    assert list(result.knowmem["rougeL_f1"]) == [1.0, 1.0, 1.0]
    assert result.metrics["knowmem_forget"] == 1.0 and result.metrics["knowmem_retain"] == 1.0
    # VerbMem against the token-cut gold: the mean of the per-item F1.
    expected = [metrics.rouge_l(g, r)["rougeL_f1"] for g, r in zip(canned[5], result.verbmem["reference"])]
    assert result.metrics["verbmem_forget"] == pytest.approx(float(np.mean(expected)))


def test_evaluation_on_the_real_news_files():
    bench = load_muse("news", require_dir(MUSE_NEWS_DIR), retain_split=None)
    texts = [*bench.verbmem_forget["prompt"][:2], *bench.privleak_forget[:2], *bench.privleak_holdout[:2],
             *bench.knowmem_forget_icl["question"], *bench.knowmem_forget_icl["answer"]]
    tokenizer = train_tokenizer(texts, 400)
    model = build_tiny_llama(SHAPE, tokenizer, 4096, seed=0).eval()
    result = evaluate_muse(model, tokenizer, bench, max_items=2, batch_size=4, max_length=512,
                           verbmem_max_new_tokens=3, knowmem_max_new_tokens=3)
    assert all(math.isfinite(result.metrics[name]) for name in HEADLINE_METRICS if name != "privleak")
    assert (result.privleak["num_tokens"] == 511).all()  # capped at max_length, BOS unscored
    assert result.knowmem["prompt"].iloc[0].startswith("Question: " + bench.knowmem_forget_icl["question"].iloc[0])


def test_evaluation_rejects_bad_inputs(small):
    bench, model, tokenizer = small
    broken = MuseBenchmark(**{**bench.__dict__, "verbmem_forget": bench.verbmem_forget.drop(columns=["gt"])})
    with pytest.raises(ValueError, match=r"verbmem_forget lacks column\(s\) \['gt'\]"):
        evaluate_muse(model, tokenizer, broken)
    # One new token: the gold text cut at 1 token is BOS alone, empty once decoded; it scores 0.
    tiny = evaluate_muse(model, tokenizer, bench, verbmem_max_new_tokens=1, knowmem_max_new_tokens=1)
    assert (tiny.verbmem["reference"] == "").all() and tiny.metrics["verbmem_forget"] == 0.0
    short = MuseBenchmark(**{**bench.__dict__, "privleak_forget": ["Hi", "Yo"]})
    with pytest.raises(ValueError, match="privleak forget text 0"):
        evaluate_muse(model, tokenizer, short, verbmem_max_new_tokens=1, knowmem_max_new_tokens=1)


# ---------------------------------------------------------------- attacks


def test_quantization_attack_measures_muse_as_its_evaluation_does(small):
    """The quantization attack on MUSE: VerbMem and KnowMem (forget, retain) before and after, each
    equal to the MUSE evaluation run on the model and on its quantized copy (Zhang et al.'s setting)."""
    from simu_core.attacks import quantize
    from simu_core.config import load_config

    bench, model, tokenizer = small
    config = load_config(overrides=["data.benchmark=muse", "attacks=[quantize]", "attack.quantize.bits=[4]",
                                    "attack.quantize.group_size=16", "eval.max_items=2", "eval.batch_size=3",
                                    "model.max_length=128"])
    before_weights = {name: value.clone() for name, value in model.state_dict().items()}
    result = quantize.run(model, tokenizer, bench, config)
    assert all(torch.equal(before_weights[name], value) for name, value in model.state_dict().items())

    def muse_figures(measured) -> dict[str, float]:
        headline = evaluate_muse(measured, tokenizer, bench, max_items=2, batch_size=3, max_length=128).metrics
        return {name: headline[name] for name in ("verbmem_forget", "knowmem_forget", "knowmem_retain")}

    quantized = quantize.quantize_weights(model, 4, 16, config.attack.quantize.scheme)
    assert any(not torch.equal(before_weights[name], value) for name, value in quantized.state_dict().items())
    table = result.table.set_index("measure")
    assert list(table.index) == ["verbmem_forget", "knowmem_forget", "knowmem_retain"]
    assert set(table["setting"]) == {"bits=4"}
    assert table["before"].to_dict() == pytest.approx(muse_figures(model), abs=1e-12)
    assert table["after"].to_dict() == pytest.approx(muse_figures(quantized), abs=1e-12)
    items = result.items
    assert set(items["phase"]) == {"before", "after"} and set(items["kind"]) == {"verbmem", "knowmem"}
    # Two VerbMem, two KnowMem-forget and one KnowMem-retain item per phase.
    assert len(items) == 2 * 5 and result.summary["items_per_split"] == {"forget": 4, "retain": 1}
