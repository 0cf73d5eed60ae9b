"""Prompt templates and tokenization: chat template vs plain, answer-only labels, EOS, max length."""

from __future__ import annotations

import pytest
import torch

from simu_core.models.tiny import train_tokenizer
from simu_core.prompting import IGNORE_INDEX, collate, encode_completion, encode_qa, format_prompt, prompt_ids

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


# ---------------------------------------------------------------- eval.template


def test_open_unlearning_template_tokenizes_prompt_and_answer_together(plain_tokenizer):
    question, answer = "Who wrote Hamlet?", "William Shakespeare wrote Hamlet."
    assert format_prompt(plain_tokenizer, question, "open_unlearning") == "Question: Who wrote Hamlet?\nAnswer: "
    example = encode_qa(plain_tokenizer, question, answer, template="open_unlearning")
    full = plain_tokenizer("Question: Who wrote Hamlet?\nAnswer: " + answer)["input_ids"]
    prompt = prompt_ids(plain_tokenizer, question, "open_unlearning")
    assert prompt == plain_tokenizer("Question: Who wrote Hamlet?\nAnswer: ")["input_ids"]
    assert example.input_ids == full + [plain_tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + example.input_ids[len(prompt):]
    # The prompt ends in a lone space token that the whole text merges into the first answer word:
    # that word's first token is in the input but never labelled (open-unlearning's default).
    assert plain_tokenizer.decode(prompt[-1:]) == " "
    simu = encode_qa(plain_tokenizer, question, answer)
    assert example.num_answer_tokens == simu.num_answer_tokens - 1
    assert example.input_ids == simu.input_ids


def test_chat_template_as_open_unlearning_applies_it(chat_tokenizer, plain_tokenizer):
    example = encode_qa(chat_tokenizer, "hello", "world", template="chat")
    # The template renders the whole conversation, " world</s>" included; no second EOS is appended.
    assert chat_tokenizer.decode(example.input_ids) == "<s>[INST] hello [/INST] world</s>"
    labelled = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert chat_tokenizer.decode(labelled) == " world</s>"
    assert chat_tokenizer.decode(prompt_ids(chat_tokenizer, "hello", "chat")) == "<s>[INST] hello [/INST]"
    with pytest.raises(ValueError, match="eval.template='chat' needs a tokenizer with a chat template"):
        encode_qa(plain_tokenizer, "hello", "world", template="chat")
    with pytest.raises(ValueError, match="eval.template must be one of"):
        prompt_ids(plain_tokenizer, "hello", "alpaca")


def test_eval_template_is_a_validated_setting_in_the_evaluate_keys():
    from flows.params import stage_params
    from simu_core.config import ConfigError, load_config

    assert load_config().eval.template == "simu"
    with pytest.raises(ConfigError, match="eval.template"):
        load_config(overrides=["eval.template=alpaca"])
    simu, ours = (stage_params(load_config(overrides=[f"eval.template={value}"]))
                  for value in ("simu", "open_unlearning"))
    assert simu["evaluate"] != ours["evaluate"] and simu["evaluate_reference"] != ours["evaluate_reference"]
    assert simu["attribute"] == ours["attribute"]
    # Unlearning reads the template only to measure its stop level (the default config stops at one).
    assert simu["unlearn"] != ours["unlearn"]
    fixed = [stage_params(load_config(overrides=[f"eval.template={value}", "unlearn.stop_at=null"]))["unlearn"]
             for value in ("simu", "open_unlearning")]
    assert fixed[0] == fixed[1]
