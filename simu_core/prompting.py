"""Prompt templates and tokenization of QA items (labels on answer tokens only, EOS appended).

Three templates (``eval.template``; fine-tuning, attribution and unlearning always use ``simu``):

``simu`` (the default; ``metrics.md``)
    A chat template when the tokenizer has one (e.g. Llama-2-chat renders
    ``[INST] {question} [/INST]``), otherwise the plain template ``Question: {question}\\nAnswer:``
    followed by `` {answer}``. Prompt and answer are tokenized separately and concatenated, so the
    boundary between unlabelled and labelled tokens is exact; every answer token and the EOS are
    labelled.
``open_unlearning``
    open-unlearning's default template (its ``Llama-2-7b-hf`` model config, ``apply_chat_template:
    False``): ``Question: {question}\\n`` + ``Answer: `` + ``{answer}``, tokenized as its
    ``preprocess_chat_instance`` does: the whole text (BOS, cut at ``max_length``) and the prompt
    alone, labels from the prompt's length on, EOS appended unless already last. The prompt ends in
    a space that the whole text merges into the first answer word, so the first answer token is
    never labelled (the prompt's lone space token is what generation starts from).
``chat``
    The tokenizer's chat template as open-unlearning applies it (``apply_chat_template: True``, no
    system prompt): the conversation [user: question, assistant: answer] rendered and tokenized by
    the template, the prompt [user: question] with the generation prompt, labels from the prompt's
    length on (the template's end-of-turn tokens included), EOS appended unless already last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
PLAIN_PROMPT = "Question: {question}\nAnswer:"
#: open-unlearning's default template: user_start_tag "Question: ", user_end_tag "\n", asst_start_tag "Answer: ".
OPEN_UNLEARNING_PROMPT = "Question: {question}\nAnswer: "
#: Values of ``eval.template`` (see the module docstring).
TEMPLATES = ("simu", "open_unlearning", "chat")
DEFAULT_TEMPLATE = "simu"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _check_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"eval.template must be one of {list(TEMPLATES)}, got {template!r}")
    if template == "chat" and not has_chat_template(tokenizer):
        raise ValueError(
            "eval.template='chat' needs a tokenizer with a chat template, and this one has none "
            "(use eval.template='simu' or 'open_unlearning')"
        )


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    # Some transformers versions return a BatchEncoding even with return_dict=False.
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text for ``question`` under ``template`` (see the module docstring)."""
    _check_template(tokenizer, template)
    if template == "open_unlearning":
        return OPEN_UNLEARNING_PROMPT.format(question=question)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def _answer_text(tokenizer: PreTrainedTokenizerBase, answer: str) -> str:
    # The plain template ends with "Answer:"; the answer follows after one space.
    return answer if has_chat_template(tokenizer) else " " + answer


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of the prompt, what generation starts from (BOS included once, whichever template)."""
    _check_template(tokenizer, template)
    if template == "chat":
        return _chat_ids(tokenizer, [{"role": "user", "content": question}], generation_prompt=True)
    text = format_prompt(tokenizer, question, template)
    if template == "open_unlearning":
        return tokenizer(text, add_special_tokens=True)["input_ids"]
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


def _encode_open_unlearning(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, max_length: int, template: str
) -> EncodedExample:
    """open-unlearning's ``preprocess_chat_instance``: whole conversation and prompt tokenized
    separately, labels from the prompt's length on, EOS appended unless already last."""
    if template == "chat":
        user = [{"role": "user", "content": question}]
        full = _chat_ids(tokenizer, [*user, {"role": "assistant", "content": answer}], generation_prompt=False)
        prompt = _chat_ids(tokenizer, user, generation_prompt=True)
        # open-unlearning does not cut chat conversations; positions past max_length would not fit
        # the model, so both are cut here as its plain path cuts them.
        full, prompt = full[:max_length], prompt[:max_length]
    else:
        text = format_prompt(tokenizer, question, template)
        full = tokenizer(text + answer, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
        prompt = tokenizer(text, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    if len(prompt) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room for the answer within max_length={max_length}: "
            f"{question[:80]!r}"
        )
    if full[-1] != tokenizer.eos_token_id:
        full = full + [tokenizer.eos_token_id]
    return EncodedExample(input_ids=full, labels=[IGNORE_INDEX] * len(prompt) + full[len(prompt):])


def encode_qa(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    max_length: int = 512,
    template: str = DEFAULT_TEMPLATE,
) -> EncodedExample:
    """Tokenize a QA pair: prompt (unlabelled) + answer + EOS (labelled), cut at ``max_length``;
    ``template`` as in the module docstring (``simu``: exact prompt/answer boundary)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers must end with EOS")
    _check_template(tokenizer, template)
    if template != "simu":
        return _encode_open_unlearning(tokenizer, question, answer, max_length, template)
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
