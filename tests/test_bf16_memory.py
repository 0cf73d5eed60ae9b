"""bf16 end to end (issue 12): fp32 masters and state for trainable entries only.

The precision contract itself (fp32 masters, fp32 state, bf16 weights keep small updates) is
tested in tests/test_precision.py. Here: over a whole bf16 SIMU run, no fp32 tensor the shape of a
frozen weight is ever created (no fp32 copy of the embeddings, the frozen MLP projections, the
whole down projections or the head), and the fp32 bytes the optimizer keeps are exactly 12 per
trainable coordinate (master, m, h).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from simu_core.config import UnlearnConfig
from simu_core.masking import NeuronMask
from simu_core.prompting import IGNORE_INDEX, EncodedExample
from simu_core.unlearning import build_trainer

VOCAB, HIDDEN, FFN, LAYERS, SEQ = 56, 24, 40, 2, 10


class Allocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[tuple[int, ...], torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.seen.add((tuple(value.shape), value.dtype))
        return out


def test_bf16_simu_makes_no_fp32_copy_of_frozen_weights():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False,
    )).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    items = [EncodedExample(ids := rng.integers(3, VOCAB, SEQ).tolist(), [IGNORE_INDEX] * 4 + ids[4:])
             for _ in range(8)]
    mask = NeuronMask(neurons=((2, 9, 31), (0, 5)), num_neurons=(FFN,) * LAYERS)
    config = UnlearnConfig(method="simu", lr=1e-4, max_steps=3, batch_size=2, gradient_checkpointing=True)
    trainer = build_trainer(model, items[:4], items[4:], config, pad_token_id=0, mask=mask, progress=False)
    recorder = Allocations()
    with recorder:
        trainer.train()
    frozen_shapes = {(FFN, HIDDEN), (VOCAB, HIDDEN), (HIDDEN, FFN)}  # gate/up, embeddings/head, whole down
    fp32 = {shape for shape, dtype in recorder.seen if dtype == torch.float32}
    assert not fp32 & frozen_shapes, f"fp32 tensors of frozen weights' shapes: {fp32 & frozen_shapes}"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(t.dtype == torch.float32 for t in state)
    trainable = sum(t.numel() for t in trainer.trainables)
    assert sum(t.nbytes for t in state) == 12 * trainable  # master + m + h, compact
