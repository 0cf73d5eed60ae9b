"""Fine-tuning: the target memorises, the retain reference does not know the forget authors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simu_core.config import load_config
from simu_core.finetune import encode_frame, finetune
from simu_core.models.tiny import build_tiny_llama, train_tokenizer
from simu_core.prompting import pad_token_id
from simu_core.scoring import answer_probabilities
from simu_core.stages import load_trained, read_benchmark


def _mean_probability(folder, config, frame):
    model, tokenizer = load_trained(folder, config)
    examples = encode_frame(tokenizer, frame, config.model.max_length)
    return float(answer_probabilities(model, examples, pad_token_id(tokenizer)).mean())


def test_target_memorises_and_reference_does_not(trained_small):
    config = trained_small["config"]
    benchmark = read_benchmark(trained_small["data"])
    target_forget = _mean_probability(trained_small["target"], config, benchmark["forget"])
    target_retain = _mean_probability(trained_small["target"], config, benchmark["retain"])
    reference_forget = _mean_probability(trained_small["reference"], config, benchmark["forget"])
    reference_retain = _mean_probability(trained_small["reference"], config, benchmark["retain"])
    assert target_forget >= 0.9 and target_retain >= 0.9
    assert reference_retain >= 0.9
    # The reference never saw the forget authors: clearly lower (loose bound on a small config).
    assert reference_forget < target_forget - 0.3
    assert trained_small["stats"]["target"]["examples"] == trained_small["sizes"]["train_target"]


def test_finetuning_is_deterministic_for_a_seed():
    config = load_config(overrides=["model.tiny.num_layers=1", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                                    "model.finetune.epochs=2", "model.finetune.batch_size=4"])
    texts = [f"Question: Q{i}?\nAnswer: A{i}." for i in range(12)]
    tokenizer = train_tokenizer(texts, 300)
    import pandas as pd

    frame = pd.DataFrame({"question": [f"Q{i}?" for i in range(12)], "answer": [f"A{i}." for i in range(12)]})
    examples = encode_frame(tokenizer, frame, 64)
    weights = []
    for _ in range(2):
        model = build_tiny_llama(config.model.tiny, tokenizer, 64, seed=1)
        result = finetune(model, tokenizer, examples, config.model.finetune, seed=5, progress=False)
        weights.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert len(result.log) == 2 * 3 and np.isfinite(result.log["loss"]).all()
    assert result.tokens_per_second > 0
    with pytest.raises(ValueError, match="at least one example"):
        finetune(model, tokenizer, [], config.model.finetune, progress=False)
