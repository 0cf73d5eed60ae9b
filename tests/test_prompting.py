"""Prompt templates and tokenization: chat template vs plain, answer-only labels, EOS, max length."""

from __future__ import annotations

import pytest
import torch

from simu_core.models.tiny import train_tokenizer
from simu_core.prompting import IGNORE_INDEX, collate, encode_completion, encode_qa, format_prompt

LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CORPUS = ["Question: Who wrote Hamlet?\nAnswer: William Shakespeare wrote Hamlet.", "[INST] hello [/INST] world"] * 20


@pytest.fixture(scope="module")
def plain_tokenizer():
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = train_tokenizer(CORPUS, 300)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def test_plain_template(plain_tokenizer):
    assert format_prompt(plain_tokenizer, "Who wrote Hamlet?") == "Question: Who wrote Hamlet?\nAnswer:"
    example = encode_qa(plain_tokenizer, "Who wrote Hamlet?", "William Shakespeare wrote Hamlet.")
    text = plain_tokenizer.decode(example.input_ids)
    assert text == "<s>Question: Who wrote Hamlet?\nAnswer: William Shakespeare wrote Hamlet.</s>"
    labelled = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert plain_tokenizer.decode(labelled) == " William Shakespeare wrote Hamlet.</s>"
    assert example.input_ids[0] == plain_tokenizer.bos_token_id
    assert example.labels[-1] == plain_tokenizer.eos_token_id


def test_chat_template_renders_inst_and_single_bos(chat_tokenizer):
    assert format_prompt(chat_tokenizer, "hello") == "<s>[INST] hello [/INST]"
    example = encode_qa(chat_tokenizer, "hello", "world")
    assert example.input_ids.count(chat_tokenizer.bos_token_id) == 1
    labelled = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert chat_tokenizer.decode(labelled) == "world</s>"
    prompt_part = [token for token, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert chat_tokenizer.decode(prompt_part) == "<s>[INST] hello [/INST]"


def test_max_length_cuts_the_answer_and_rejects_long_prompts(plain_tokenizer):
    full = encode_qa(plain_tokenizer, "Who wrote Hamlet?", "William Shakespeare wrote Hamlet.")
    cut = encode_qa(plain_tokenizer, "Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", max_length=len(full.input_ids) - 2)
    assert len(cut.input_ids) == len(full.input_ids) - 2
    assert cut.input_ids == full.input_ids[:-2]
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(plain_tokenizer, "Who wrote Hamlet? " * 20, "x", max_length=16)


def test_completion_has_no_template(plain_tokenizer):
    example = encode_completion(plain_tokenizer, "Who wrote", " Hamlet?")
    assert plain_tokenizer.decode(example.input_ids) == "<s>Who wrote Hamlet?</s>"
    assert example.num_answer_tokens == len(plain_tokenizer(" Hamlet?", add_special_tokens=False)["input_ids"]) + 1


def test_collate_pads_on_the_requested_side(plain_tokenizer):
    short = encode_qa(plain_tokenizer, "Who?", "Hamlet.")
    long = encode_qa(plain_tokenizer, "Who wrote Hamlet?", "William Shakespeare wrote Hamlet.")
    right = collate([short, long], pad_token_id=0)
    left = collate([short, long], pad_token_id=0, padding_side="left")
    n = len(short.input_ids)
    assert right["input_ids"][0, :n].tolist() == short.input_ids and right["attention_mask"][0].sum() == n
    assert left["input_ids"][0, -n:].tolist() == short.input_ids and left["attention_mask"][0, : -n].sum() == 0
    assert torch.all(right["labels"][0, n:] == IGNORE_INDEX)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)
