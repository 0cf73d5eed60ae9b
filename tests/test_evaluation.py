"""Model-side evaluation: batched scoring and generation, the TOFU-style suite on the built-in models."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from simu_core.config import EvalConfig, TinyModelConfig
from simu_core.data.schema import QABenchmark
from simu_core.data.synthetic import generate_synthetic
from simu_core.evaluation import (
    QA_HEADLINE_METRICS,
    cut_at_eos,
    evaluate_qa,
    generate_greedy,
    score_examples,
)
from simu_core.metrics import MODEL_UTILITY_COMPONENTS
from simu_core.models.tiny import build_tiny_llama, train_tokenizer
from simu_core.prompting import encode_qa, pad_token_id, prompt_ids
from simu_core.scoring import answer_nlls

SHAPE = TinyModelConfig(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, vocab_size=300)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama and a BPE tokenizer trained on QA-like texts."""
    texts = [f"Question: What did author {i} write?\nAnswer: Author {i} wrote {'long ' * (i % 6)}books." for i in range(60)]
    tokenizer = train_tokenizer(texts, SHAPE.vocab_size)
    model = build_tiny_llama(SHAPE, tokenizer, 128, seed=3).eval()
    return model, tokenizer


def _examples(tokenizer, count=11):
    # Varied prompt and answer lengths, so that batches need padding.
    return [
        encode_qa(tokenizer, f"What did {'the famous ' * (i % 4)}author {i} write?", "Books " + "and more " * (i % 5))
        for i in range(count)
    ]


def test_batched_nll_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    batched = score_examples(model, examples, pad_token_id(tokenizer), batch_size=4, token_stats=True)
    single = score_examples(model, examples, pad_token_id(tokenizer), batch_size=1, token_stats=True)
    np.testing.assert_allclose(batched.nll, single.nll, rtol=1e-5, atol=1e-6)
    # Same numbers as the training-side helper (a different code path, right padding too).
    np.testing.assert_allclose(batched.nll, answer_nlls(model, examples, pad_token_id(tokenizer), 1), rtol=1e-5)
    for index, example in enumerate(examples):
        assert batched.num_tokens[index] == example.num_answer_tokens
        np.testing.assert_allclose(batched.token_logprobs[index], single.token_logprobs[index], atol=1e-5)
        np.testing.assert_allclose(batched.vocab_mean[index], single.vocab_mean[index], atol=1e-5)
        np.testing.assert_allclose(batched.vocab_std[index], single.vocab_std[index], atol=1e-5)
        np.testing.assert_array_equal(batched.argmax_match[index], single.argmax_match[index])
        # The mean NLL is the mean of the per-token log-probs.
        assert math.isclose(-batched.token_logprobs[index].mean(), batched.nll[index], rel_tol=1e-5)


def test_token_stats_only_where_asked(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer, 4)
    scored = score_examples(model, examples, pad_token_id(tokenizer), 4, token_stats=[True, False, True, False])
    assert scored.token_logprobs[1] is None and scored.token_logprobs[2] is not None
    with pytest.raises(ValueError, match="3 flags for 4 examples"):
        score_examples(model, examples, pad_token_id(tokenizer), 4, token_stats=[True] * 3)
    with pytest.raises(ValueError, match="at least one example"):
        score_examples(model, [], pad_token_id(tokenizer))


def test_left_padded_batched_generation_equals_unbatched(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, f"What did {'the famous ' * (i % 5)}author {i} write?") for i in range(7)]
    assert len({len(prompt) for prompt in prompts}) > 3
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate_greedy(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)[0] for prompt in prompts]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)


def test_generation_is_cut_at_eos(tiny):
    model, tokenizer = tiny
    assert cut_at_eos([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert cut_at_eos([5, 6], [2]) == [5, 6]
    assert cut_at_eos([9, 5], [2, 9]) == []
    prompts = [prompt_ids(tokenizer, f"What did {'the famous ' * i}author write?") for i in range(3)]
    stop_at = max(len(prompt) for prompt in prompts) + 3
    # Expected: plain greedy decoding of exactly the tokens before the forced EOS.
    expected = [
        generate_greedy(model, tokenizer, [prompt], max_new_tokens=stop_at - len(prompt))[0] for prompt in prompts
    ]
    original = model.forward

    def forward(*args, attention_mask=None, **kwargs):
        # Force EOS once a row holds stop_at real tokens: rows of one batch stop at different steps.
        output = original(*args, attention_mask=attention_mask, **kwargs)
        output.logits[attention_mask.sum(-1) >= stop_at, -1, tokenizer.eos_token_id] = 1e4
        return output

    model.forward = forward
    try:
        texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=30, batch_size=3)
    finally:
        del model.forward
    assert texts == expected
    # Nothing after the EOS survives: without it the same 30-token budget decodes further.
    unforced = generate_greedy(model, tokenizer, prompts, max_new_tokens=30, batch_size=3)
    for text, longer in zip(texts, unforced):
        assert longer.startswith(text) and len(longer) > len(text)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(num_authors=10, holdout_authors=1, general_facts=4)


def _replace_split(benchmark: QABenchmark, split: str, frame: pd.DataFrame) -> QABenchmark:
    splits = dict(benchmark.splits)
    splits[split] = frame
    # Bypass the constructor's checks: the suite must catch what a hand-built object lets through.
    broken = QABenchmark.__new__(QABenchmark)
    broken.name, broken.forget_split, broken.splits = benchmark.name, benchmark.forget_split, splits
    return broken


def test_empty_split_is_a_clear_error(tiny, synthetic):
    model, tokenizer = tiny
    broken = _replace_split(synthetic, "holdout", synthetic["holdout"].iloc[:0])
    with pytest.raises(ValueError, match="'holdout' is empty"):
        evaluate_qa(model, tokenizer, broken, EvalConfig())


def test_missing_column_and_empty_options_are_clear_errors(tiny, synthetic):
    model, tokenizer = tiny
    broken = _replace_split(synthetic, "forget", synthetic["forget"].drop(columns=["paraphrased_answer"]))
    with pytest.raises(ValueError, match=r"'forget' lacks columns \['paraphrased_answer'\]"):
        evaluate_qa(model, tokenizer, broken, EvalConfig())
    frame = synthetic["world_facts"].copy()
    frame.at[1, "perturbed_answer"] = []
    with pytest.raises(ValueError, match="'world_facts', row 1: perturbed_answer must be a non-empty list"):
        evaluate_qa(model, tokenizer, _replace_split(synthetic, "world_facts", frame), EvalConfig())


# ---------------------------------------------------------------- the built-in target and retain reference


@pytest.mark.slow
def test_builtin_target_vs_retain_reference(trained_small, tmp_path):
    from simu_core.stages import evaluate

    config = trained_small["config"].model_copy(deep=True)
    # Answers are one short sentence: 40 new tokens cover them; 20 items per split keep it quick.
    config.eval.max_new_tokens = 40
    config.eval.max_items = 20
    data = trained_small["data"]
    alone = evaluate(config, data, trained_small["reference"], tmp_path / "reference")
    assert "forget_quality" not in alone and alone["forget_quality_computed"] == 0.0
    assert "privleak" not in alone and alone["privleak_computed"] == 0.0
    assert (tmp_path / "reference" / "notes.txt").read_text().startswith("forget_quality and privleak not computed")
    reference_items = tmp_path / "reference" / "items.parquet"

    own = evaluate(config, data, trained_small["reference"], tmp_path / "reference_self", reference_items)
    target = evaluate(config, data, trained_small["target"], tmp_path / "target", reference_items)
    assert own["forget_quality"] == 1.0 and own["privleak"] == 0.0
    assert target["forget_quality"] < 0.1  # far below the reference's own 1.0
    assert target["forget_prob"] >= 0.9 and target["forget_rouge"] >= 0.9
    assert own["forget_prob"] < 0.5
    # The memorised forget set is told apart from the holdout authors; the reference's is not.
    assert target["mia_min_k_auc"] > 0.9 and target["privleak"] < -50
    for name in (*QA_HEADLINE_METRICS, *MODEL_UTILITY_COMPONENTS):
        assert math.isfinite(target[name]), name

    items = pd.read_parquet(tmp_path / "target" / "items.parquet")
    metrics = pd.read_parquet(tmp_path / "target" / "metrics.parquet")
    assert list(metrics.columns) == ["benchmark", "split", "metric", "value"]
    assert set(metrics["split"]) == {"forget", "retain_eval", "real_authors", "world_facts", "holdout", "all"}
    forget = items[items["split"] == "forget"]
    assert len(forget) == 20 and forget["generation"].str.len().gt(0).all()
    # The stored per-item columns recompute the aggregates.
    assert math.isclose(forget["probability"].mean(), target["forget_prob"], rel_tol=1e-12)
    assert math.isclose(forget["rouge"].mean(), target["forget_rouge"], rel_tol=1e-12)
    assert all(len(values) == 5 for values in forget["nll_perturbed"])


def test_reference_items_must_cover_the_same_items(tiny, synthetic, tmp_path):
    model, tokenizer = tiny
    config = EvalConfig(max_items=3, max_new_tokens=2, batch_size=32)
    result = evaluate_qa(model, tokenizer, synthetic, config)
    result.save(tmp_path)
    reference = pd.read_parquet(tmp_path / "items.parquet")
    again = evaluate_qa(model, tokenizer, synthetic, config, reference_items=reference)
    assert again.value("forget_quality") == 1.0 and again.value("privleak") == 0.0
    with pytest.raises(ValueError, match="different 'forget' items"):
        evaluate_qa(model, tokenizer, synthetic, config, reference_items=reference.iloc[1:])
    with pytest.raises(ValueError, match="lacks columns"):
        evaluate_qa(model, tokenizer, synthetic, config, reference_items=reference.drop(columns=["truth_ratio"]))


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "olmo", "olmo2", "gpt2", "gpt_neox", "opt"])
def test_shared_prompt_scoring_equals_full_sequences(architecture):
    from model_factory import build

    from simu_core.prompting import IGNORE_INDEX, EncodedExample

    model = build(architecture)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for item in range(7):
        # Prompts of different lengths, each continued by 1-3 answers of different lengths.
        prompt = [1] + torch.randint(3, 96, (2 + item % 4,), generator=generator).tolist()
        for variant in range(1 + item % 3):
            answer = torch.randint(3, 96, (1 + (item + variant) % 5,), generator=generator).tolist() + [2]
            examples.append(EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    full = score_examples(model, examples, 0, batch_size=5, token_stats=True)
    shared = score_examples(model, examples, 0, batch_size=5, token_stats=True, share_prompts=True)
    np.testing.assert_allclose(shared.nll, full.nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(shared.num_tokens, full.num_tokens)
    for index in range(len(examples)):
        np.testing.assert_allclose(shared.token_logprobs[index], full.token_logprobs[index], atol=1e-5)
        np.testing.assert_allclose(shared.vocab_std[index], full.vocab_std[index], atol=1e-5)
        np.testing.assert_array_equal(shared.argmax_match[index], full.argmax_match[index])
    with pytest.raises(ValueError, match="no unlabelled prompt"):
        score_examples(model, [EncodedExample([1, 5, 6], [1, 5, 6])], 0, share_prompts=True)


def test_light_reference_suite_scores_only_what_is_compared(tiny, synthetic):
    """A retain reference needs only its forget truth ratios and forget/holdout MIA scores (issue 11, 12)."""
    model, tokenizer = tiny
    config = EvalConfig(max_items=4, max_new_tokens=3, batch_size=32)
    full = evaluate_qa(model, tokenizer, synthetic, config)
    light = evaluate_qa(model, tokenizer, synthetic, config, light=True)
    assert set(light.items["split"]) == {"forget", "holdout"} and light.items["generation"].isna().all()
    compared = full.items[full.items["split"].isin(["forget", "holdout"])].reset_index(drop=True)
    for column in ("nll", "truth_ratio", "mia_min_k", "mia_zlib"):
        np.testing.assert_allclose(light.items[column], compared[column], rtol=1e-5, atol=1e-7, err_msg=column)
    headline, full_headline = light.headline(), full.headline()
    # What is not computed is absent, with a flag and a note; nothing is made up.
    assert "model_utility" not in headline and headline["model_utility_computed"] == 0.0
    assert full_headline["model_utility_computed"] == 1.0
    assert not [name for name in headline if name.endswith("_rouge") or name.split("_")[0] in ("retain", "ra", "wf")]
    assert set(light.metrics["split"]) == {"forget", "holdout", "all"}
    assert "eval.reference_full" in light.notes[0]
    for name in ("forget_prob", "forget_truth_ratio", "mia_min_k_auc", "extraction_strength"):
        assert math.isclose(headline[name], full_headline[name], rel_tol=1e-5), name
    # Forget quality and privleak of a model are the same against either suite of its reference.
    against_full = evaluate_qa(model, tokenizer, synthetic, config, reference_items=full.items).headline()
    against_light = evaluate_qa(model, tokenizer, synthetic, config, reference_items=light.items).headline()
    for name in ("forget_quality", "privleak"):
        assert math.isclose(against_full[name], against_light[name], rel_tol=1e-6, abs_tol=1e-9), name
