"""Batched generation with left padding, cut at EOS: greedy (the TOFU / LUME evaluation settings) or
sampled (AltPO's alternate answers)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from simu_core.prompting import pad_token_id as resolve_pad_token_id


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS plus the model's configured EOS ids
    (chat models such as Llama-3 stop on several)."""
    ids: list[int] = []
    candidates: list[int | Iterable[int] | None] = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        if candidate is None:
            continue
        for value in [candidate] if isinstance(candidate, int) else candidate:
            if value not in ids:
                ids.append(int(value))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; generations cannot be cut")
    return ids


def cut_at_eos(token_ids: Sequence[int], eos_ids: Iterable[int]) -> list[int]:
    """The tokens before the first EOS (all of them when there is none)."""
    eos = set(eos_ids)
    for position, token in enumerate(token_ids):
        if token in eos:
            return list(token_ids[:position])
    return list(token_ids)


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of tokenized ``prompts`` (in the input order), cut at the first EOS.

    Prompts are sorted by length and left-padded so that every row's last prompt token sits in the
    last column, where generation starts; decoding drops special tokens.
    """
    return [texts[0] for texts in _generate(model, tokenizer, prompts, max_new_tokens, batch_size, None, 1)]


@torch.no_grad()
def generate_sampled(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    samples: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
) -> list[list[str]]:
    """``samples`` sampled continuations of each prompt (plain sampling at ``temperature``, no top-k
    or top-p), cut at the first EOS; reproducible from ``seed``, and the global RNG is left as it was."""
    if samples < 1 or not temperature > 0:
        raise ValueError(f"samples must be >= 1 and temperature > 0, got {samples} and {temperature}")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, samples)


def _generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    temperature: float | None,
    samples: int,
) -> list[list[str]]:
    """Greedy (``temperature`` None) or sampled continuations, ``samples`` per prompt, in input order."""
    if not prompts:
        raise ValueError("generation needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
    pad_id = resolve_pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    # A fresh config: no sampling parameters inherited from the checkpoint's defaults.
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature is not None else \
        dict(do_sample=False)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        num_return_sequences=samples,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    texts: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[index]) for index in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                prompt = prompts[index]
                input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
                attention_mask[row, width - len(prompt) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
            )
            new_tokens = output[:, width:].cpu().tolist()  # row r * samples + k: sample k of chunk row r
            for row, index in enumerate(chunk):
                for sample in range(samples):
                    kept = cut_at_eos(new_tokens[row * samples + sample], eos_ids)
                    texts[index].append(tokenizer.decode(kept, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
