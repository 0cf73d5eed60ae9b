"""Tiny randomly initialised models of every architecture the adapter supports (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
HIDDEN = 32
FF = 64
LAYERS = 2
HEADS = 4

_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_LLAMA_LIKE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_LIKE)),
    "olmo": lambda: OlmoForCausalLM(OlmoConfig(**_LLAMA_LIKE)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**_LLAMA_LIKE)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FF, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                   bos_token_id=1, eos_token_id=2)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    ),
    # OPT flattens the MLP input to [batch * seq, d_ff] before fc2.
    "opt": lambda: OPTForCausalLM(
        OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=FF,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0)
    ),
}


def build(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``architecture`` (a key of BUILDERS), in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[architecture]().eval()


def random_examples(count: int, seed: int, vocab: int):
    """Random items: a 4-7 token prompt (unlabelled) and a 3-5 token answer (labelled)."""
    from simu_core.prompting import IGNORE_INDEX, EncodedExample

    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        prompt = rng.integers(3, vocab, rng.integers(4, 8)).tolist()
        answer = rng.integers(3, vocab, rng.integers(3, 6)).tolist()
        items.append(EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return items
