"""TOFU token-level statistics as open-unlearning's evaluator computes them (issue 11, defect 9).

The oracle below restates, item by item on one unpadded sequence, what open-unlearning's
evaluator computes (``src/evals/metrics/utils.py``: ``evaluate_probability``,
``tokenwise_logprobs``, ``tokenwise_vocab_logprobs``, ``extract_target_texts_from_processed_data``;
``memorization.py``: exact memorisation, extraction strength; ``mia/``: LOSS, ZLib, Min-K%,
Min-K%++ with k = 0.4). Its rules: LOSS and ZLib use every labelled token; the token-level
statistics drop the last labelled token (the EOS); ZLib compresses the decoded label tokens. The
suite's per-item values must equal the oracle's on a trained model, for each template.

The published logs (``../shared/data/reference-evals``) are of a 7B model and are checked, metric
by metric, in ``test_metrics_reference_evals.py``; here the same rules meet a model we can run.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from simu_core.config import EvalConfig
from simu_core.evaluation import evaluate_qa
from simu_core.evaluation.qa import TOKEN_STAT_SPLITS, evaluation_splits
from simu_core.prompting import IGNORE_INDEX, encode_qa
from simu_core.stages import load_trained, read_benchmark

K = 0.4  # open-unlearning's TOFU Min-K% / Min-K%++ k


def _min_k(scores: np.ndarray) -> float:
    if scores.size == 0:
        return 0.0
    num_k = max(1, int(len(scores) * K))
    return -float(np.mean(np.sort(scores)[:num_k]))


# The oracle runs in float64, the suite in float32: statistics agree to ~1e-5 (Min-K%++ divides by
# a small sigma). Keeping the EOS moves them by 1e-3 (ZLib) to 1 (Min-K%) on these models.
@torch.no_grad()
def open_unlearning_statistics(model, tokenizer, input_ids: list[int], labels: list[int]) -> dict[str, float]:
    """One item's statistics, computed as open-unlearning's evaluator does (a batch of one)."""
    ids = torch.tensor([input_ids])
    label_tensor = torch.tensor(labels)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
    # evaluate_probability: mean cross-entropy over every labelled token (EOS included).
    shifted = label_tensor[1:]
    labelled = shifted != IGNORE_INDEX
    token_nll = torch.nn.functional.cross_entropy(logits[:-1], shifted.clamp(min=0), reduction="none")
    avg_loss = float(token_nll[labelled].sum() / (label_tensor != IGNORE_INDEX).sum())
    # ZLib: the decoded label tokens, special tokens skipped.
    text = tokenizer.decode(label_tensor[label_tensor != IGNORE_INDEX].tolist(), skip_special_tokens=True)
    # tokenwise_(vocab_)logprobs: labelled positions minus the last one ("ignore eos prediction").
    log_probs = torch.log_softmax(logits, dim=-1)[:-1]
    actual = (label_tensor != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
    start, end = int(actual[0]), int(actual[-1])
    vocab = log_probs[start - 1 : end]
    target = vocab.gather(-1, ids[0, start : end + 1, None]).squeeze(-1)
    token_labels = label_tensor[actual]
    # Min-K%++: standardised by the model's own mean and variance of log p (variance clamped).
    mu = (vocab.exp() * vocab).sum(-1)
    sigma = ((vocab.exp() * vocab.square()).sum(-1) - mu.square()).clamp(min=1e-6)
    standardised = ((target - mu) / sigma.sqrt()).numpy()
    # Exact memorisation and extraction strength from the argmax predictions.
    predictions = vocab.argmax(-1)
    matches = (predictions == token_labels).numpy()
    valid = len(token_labels)
    for k in range(valid):
        if torch.equal(predictions[k:], token_labels[k:]):
            break
    return {
        "mia_loss": avg_loss,
        "mia_zlib": avg_loss / len(zlib.compress(text.encode("utf-8"))),
        "mia_min_k": _min_k(target.numpy()),
        "mia_min_k_plus_plus": _min_k(standardised),
        "exact_memorization": float(matches.sum() / valid),
        "extraction_strength": 1 - k / valid,
        "last_token_matches": bool(matches[-1]),
    }


@pytest.fixture(scope="module")
def models(trained_small):
    """The target (memorised its forget set) and the retain reference (never saw it)."""
    config = trained_small["config"]
    loaded = {which: load_trained(trained_small[which], config) for which in ("target", "reference")}
    return loaded, read_benchmark(trained_small["data"]), config


@pytest.mark.slow
@pytest.mark.parametrize("which", ["target", "reference"])
@pytest.mark.parametrize("template", ["simu", "open_unlearning"])
def test_token_statistics_equal_open_unlearning(models, which, template):
    loaded, benchmark, config = models
    model, tokenizer = loaded[which]
    eval_config = EvalConfig(max_items=12, max_new_tokens=2, batch_size=8, template=template)
    items = evaluate_qa(model, tokenizer, benchmark, eval_config, max_length=config.model.max_length).items
    splits = evaluation_splits(benchmark, eval_config.max_items)
    compared, last_wrong = 0, 0
    for split in TOKEN_STAT_SPLITS:
        ours = items[items["split"] == split].reset_index(drop=True)
        for row, item in splits[split].iterrows():
            example = encode_qa(tokenizer, item["question"], item["answer"], config.model.max_length, template=template)
            expected = open_unlearning_statistics(model, tokenizer, example.input_ids, example.labels)
            columns = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]
            if split == "forget":
                columns.append("exact_memorization")
                # Extraction strength: open-unlearning's loop stops at k = T - 1 (1/T for an item
                # whose last token is wrong); the suite keeps metrics.md's 0 there (docs/design.md).
                if expected["last_token_matches"]:
                    columns.append("extraction_strength")
                else:
                    last_wrong += 1
                    assert ours.loc[row, "extraction_strength"] == 0.0
            for column in columns:
                assert ours.loc[row, column] == pytest.approx(expected[column], rel=1e-4, abs=1e-5), (split, row, column)
            compared += 1
    assert compared == 24
    forget = items[items["split"] == "forget"]
    # Neither comparison is between zeros: the target memorised its forget set, the reference
    # predicts part of it (shared phrasing), so its exact memorisation depends on the EOS.
    memorised = forget["exact_memorization"].mean()
    assert memorised > 0.9 if which == "target" else 0.1 < memorised < 0.9

