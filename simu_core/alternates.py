"""AltPO's alternate answers: the target itself, shown a forget question and its answer, writes others.

AltPO (Mekala et al. 2024, "Alternate Preference Optimization for Unlearning Factual Knowledge in
Large Language Models") trains the model to prefer plausible wrong answers that the model itself
wrote over the true forget answers. open-unlearning's recipe (``community/methods/AltPO``:
``generate.py``, ``prompts.py``): the fine-tuned target is prompted with the question and the true
answer and asked for another plausible answer that changes its facts; 5 samples per question,
temperature 1.0, at most 200 new tokens, cut at "Question:" / "Q:"; every (question, answer,
alternate) is a training row of its own.

**Our prompt.** The instruction is put in the model's own QA format (:func:`simu_core.prompting.prompt_ids`:
its chat template when it has one, ``Question: ...\\nAnswer:`` otherwise), so a model fine-tuned on
that format, chat or not, is asked in the way it answers; open-unlearning's Llama-3 instruction
template assumes a chat model. Small models that never learnt to follow instructions write what
they write: the alternates are what the method would train on, and the stage reports how many are
empty or equal to the true answer.
"""

from __future__ import annotations

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.evaluation.generation import generate_sampled
from simu_core.prompting import prompt_ids

ALTERNATE_INSTRUCTION = (
    "{question}\nOne answer is: {answer}\n"
    "Write another answer to this question that sounds just as plausible but changes every fact in it."
)
STOP_STRINGS = ("Question:", "Q:")  # AltPO's stop strings

__all__ = ["ALTERNATE_INSTRUCTION", "STOP_STRINGS", "alternate_prompt", "cut_at_stop", "generate_alternates"]


def alternate_prompt(question: str, answer: str) -> str:
    """The question the model answers with an alternate: the forget question, its answer, the instruction."""
    return ALTERNATE_INSTRUCTION.format(question=question, answer=answer)


def cut_at_stop(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    """``text`` before the first stop string, stripped."""
    cut = min((text.index(stop) for stop in stops if stop in text), default=len(text))
    return text[:cut].strip()


def generate_alternates(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: pd.DataFrame,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_length: int,
    batch_size: int = 16,
) -> pd.DataFrame:
    """``samples`` alternates per forget item: one row per (item, sample) with ``item_id``, ``question``,
    ``answer``, ``sample`` and ``alternate``, in the forget items' order. Prompts longer than
    ``max_length`` keep their last tokens (the instruction and the answer cue)."""
    missing = [column for column in ("item_id", "question", "answer") if column not in forget.columns]
    if missing:
        raise ValueError(f"the forget split lacks columns {missing} needed for alternates")
    prompts = [prompt_ids(tokenizer, alternate_prompt(q, a))[-max_length:]
               for q, a in zip(forget["question"], forget["answer"])]
    texts = generate_sampled(model, tokenizer, prompts, max_new_tokens, samples, temperature, seed, batch_size)
    rows = []
    for (item_id, question, answer), item_texts in zip(forget[["item_id", "question", "answer"]].itertuples(index=False),
                                                       texts):
        for sample, text in enumerate(item_texts):
            rows.append({"item_id": item_id, "question": question, "answer": answer, "sample": sample,
                         "alternate": cut_at_stop(text)})
    return pd.DataFrame(rows, columns=["item_id", "question", "answer", "sample", "alternate"])
