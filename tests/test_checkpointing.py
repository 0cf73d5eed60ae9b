"""Gradient checkpointing (issue 12): less activation memory, the same results.

``unlearn.gradient_checkpointing`` and ``model.finetune.gradient_checkpointing`` recompute each
decoder layer in the backward (transformers' non-reentrant checkpointing). The weights a run ends
with must be those of a run without it (within fp32 rounding; on CPU they are bit-identical), which
is why neither field is in a cache key (tests/test_cache_keys.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from simu_core.config import FinetuneConfig, UnlearnConfig
from simu_core.finetune import finetune
from simu_core.masking import NeuronMask
from simu_core.memtrack import TensorMemoryTracker
from simu_core.models.checkpointing import gradient_checkpointing
from simu_core.prompting import IGNORE_INDEX, EncodedExample
from simu_core.unlearning import build_trainer

VOCAB, HIDDEN, FFN, LAYERS = 64, 32, 64, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    ))


def examples(count: int, seed: int, length: int | None = None) -> list[EncodedExample]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        size = length or int(rng.integers(8, 14))
        ids = rng.integers(3, VOCAB, size).tolist()
        items.append(EncodedExample(ids, [IGNORE_INDEX] * (size // 2) + ids[size // 2:]))
    return items


FORGET, RETAIN = examples(6, seed=1), examples(10, seed=2)


def unlearn(method: str, checkpointing: bool):
    model = tiny_model()
    mask = NeuronMask(neurons=((1, 7), (0, 3, 40), (63,)), num_neurons=(FFN,) * LAYERS) if method == "simu" else None
    config = UnlearnConfig(method=method, lr=1e-3, max_steps=4, batch_size=3, grad_accum=2,
                           gradient_checkpointing=checkpointing)
    result = build_trainer(model, FORGET, RETAIN, config, pad_token_id=0, mask=mask, progress=False).train()
    return model, result.log


@pytest.mark.parametrize("method", ["simu", "so_graddiff", "fo_graddiff", "npo"])
def test_unlearning_with_checkpointing_gives_the_same_weights(method):
    plain, plain_log = unlearn(method, False)
    checkpointed, checkpointed_log = unlearn(method, True)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    np.testing.assert_allclose(checkpointed_log["forget_loss"], plain_log["forget_loss"], rtol=1e-6)
    # Switched off again afterwards, without the input-gradient hook transformers adds.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    assert not checkpointed.get_input_embeddings()._forward_hooks


def test_finetuning_with_checkpointing_gives_the_same_weights():
    class Tokenizer:
        pad_token_id = 0

    models = []
    for checkpointing in (False, True):
        model = tiny_model()
        config = FinetuneConfig(epochs=2, lr=1e-3, batch_size=4, gradient_checkpointing=checkpointing)
        finetune(model, Tokenizer(), FORGET + RETAIN, config, progress=False)
        models.append(model)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


def _peak_of_a_backward(checkpointing: bool) -> int:
    model = tiny_model()
    batch = torch.randint(3, VOCAB, (8, 48))
    tracker = TensorMemoryTracker()
    tracker.register(model.parameters())
    model.train()
    with gradient_checkpointing(model, checkpointing), tracker:
        model(input_ids=batch).logits.float().logsumexp(-1).mean().backward()
    return tracker.peak


def test_checkpointing_lowers_the_activation_peak():
    plain, checkpointed = _peak_of_a_backward(False), _peak_of_a_backward(True)
    assert checkpointed < 0.8 * plain


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        with gradient_checkpointing(torch.nn.Linear(2, 2)):
            pass
