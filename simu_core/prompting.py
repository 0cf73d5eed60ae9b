"""Prompt templates and tokenization of QA items (labels on answer tokens only, EOS appended).

Rules (``metrics.md``): a chat template when the tokenizer has one (e.g. Llama-2-chat renders
``[INST] {question} [/INST]``), otherwise the plain template ``Question: {question}\\nAnswer:``
followed by `` {answer}``. Prompt and answer are tokenized separately and concatenated, so the
boundary between unlabelled and labelled tokens is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
PLAIN_PROMPT = "Question: {question}\nAnswer:"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The prompt text for ``question`` (chat template with a generation prompt, else plain)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def _answer_text(tokenizer: PreTrainedTokenizerBase, answer: str) -> str:
    # The plain template ends with "Answer:"; the answer follows after one space.
    return answer if has_chat_template(tokenizer) else " " + answer


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of the prompt (BOS included once, whichever template)."""
    text = format_prompt(tokenizer, question)
    # A chat template already renders BOS as text; adding special tokens again would double it.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized example: ``labels`` is IGNORE_INDEX on prompt positions."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_qa(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, max_length: int = 512
) -> EncodedExample:
    """Tokenize a QA pair: prompt (unlabelled) + answer + EOS (labelled), cut at ``max_length``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers must end with EOS")
    prompt = prompt_ids(tokenizer, question)
    answer_ids = tokenizer(_answer_text(tokenizer, answer), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room for the answer within max_length={max_length}: "
            f"{question[:80]!r}"
        )
    answer_ids = answer_ids[: max_length - len(prompt)]
    return EncodedExample(input_ids=prompt + answer_ids, labels=[IGNORE_INDEX] * len(prompt) + answer_ids)


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prefix: str, continuation: str, max_length: int = 512
) -> EncodedExample:
    """Tokenize a raw continuation (LUME): no template; labels on the continuation + EOS."""
    prompt = tokenizer(prefix, add_special_tokens=True)["input_ids"][: max_length - 1]
    rest = tokenizer(continuation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rest = rest[: max_length - len(prompt)]
    return EncodedExample(input_ids=prompt + rest, labels=[IGNORE_INDEX] * len(prompt) + rest)


def collate(
    examples: Sequence[EncodedExample], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch into ``input_ids``, ``attention_mask``, ``labels`` tensors."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        span = slice(width - length, width) if padding_side == "left" else slice(0, length)
        input_ids[row, span] = torch.tensor(example.input_ids)
        labels[row, span] = torch.tensor(example.labels)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, falling back to EOS for tokenizers without one (Llama, GPT-2)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return tokenizer.eos_token_id
