"""In-context attack: other forget items shown in the prompt (Patil et al., arXiv 2309.17410; Lynch
et al., arXiv 2402.16835 call it in-context relearning).

The forget items are split by item (seeded): a share ``attack.in_context.fraction`` is the pool the
shown items come from, the rest is measured. Before each measured question go ``k`` items of the pool
(question and answer, drawn per measured item), written in the prompt template's own QA format, so
that the model reads them as earlier answered questions. The forget measures of the measured items
without (before) and with (after) them; ``k = 0`` is the plain evaluation of those items. The same
prompts are given to every model (the draw depends on the seed and the items only).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.attacks.measures import AttackOutcome, outcome, phase_items, score, summarise, table_rows
from simu_core.config import SimuConfig
from simu_core.data.schema import QABenchmark
from simu_core.prompting import prompt_ids


def split_items(item_count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, measured)`` rows of the forget split (both sorted), drawn with
    ``numpy.random.default_rng([seed, 2])``: ``round(fraction * item_count)`` pool rows."""
    pool_count = int(round(fraction * item_count))
    if pool_count < 1 or pool_count >= item_count:
        raise ValueError(
            f"attack.in_context.fraction={fraction} of {item_count} forget items gives {pool_count} item(s) to show "
            f"and {item_count - pool_count} to measure: both parts need at least one item"
        )
    order = np.random.default_rng([seed, 2]).permutation(item_count)
    return np.sort(order[:pool_count]), np.sort(order[pool_count:])


def check_sizes(k: int, fraction: float, forget_items: int) -> None:
    """Fail before any work when ``k`` exceeds the items that can be shown (the forget set minus the
    measured items) or a part of the split is empty."""
    pool, _ = split_items(forget_items, fraction, 0)
    if k > len(pool):
        raise ValueError(
            f"attack.in_context.k={k} is larger than the {len(pool)} forget items that can be shown (the forget set's "
            f"{forget_items} items minus the {forget_items - len(pool)} measured; attack.in_context.fraction={fraction}): "
            f"lower k or raise the fraction"
        )


def in_context_question(shots: list[tuple[str, str]], question: str) -> str:
    """``question`` preceded by the ``shots`` (question, answer) in the plain QA format: the prompt
    template then renders ``Question: q1\\nAnswer: a1\\n\\nQuestion: q2 ...\\n\\nQuestion: q\\nAnswer:``
    (the ``simu`` and ``open_unlearning`` templates); a chat template puts them in the user's message."""
    text = question
    for shot_question, shot_answer in reversed(shots):
        text = f"{shot_question}\nAnswer: {shot_answer}\n\nQuestion: {text}"
    return text


def shown_questions(measured: pd.DataFrame, pool: pd.DataFrame, k: int, seed: int) -> list[str]:
    """Each measured item's question with ``k`` pool items before it, drawn without replacement per
    item with ``default_rng([seed, 3])`` (in draw order)."""
    rng = np.random.default_rng([seed, 3])
    questions = []
    for question in measured["question"]:
        rows = rng.choice(len(pool), size=k, replace=False) if k else []
        questions.append(in_context_question([(pool["question"].iloc[row], pool["answer"].iloc[row]) for row in rows],
                                             question))
    return questions


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest input a model with learned position embeddings takes (GPT-2's ``wpe``, OPT's
    ``embed_positions``, BERT-style ``position_embeddings``); ``None`` for rotary models (Llama,
    Mistral, Qwen...), which compute any position."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("wpe", "embed_positions", "position_embeddings") and isinstance(
                module, torch.nn.Embedding):
            offset = getattr(module, "offset", 0)  # OPT's learned positions start at index 2
            return module.num_embeddings - offset
    return None


def run(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: QABenchmark,
        config: SimuConfig) -> AttackOutcome:
    """Forget measures of the measured items without and with ``k`` forget items before each question."""
    settings = config.attack.in_context
    started = time.perf_counter()
    forget = benchmark["forget"].reset_index(drop=True)
    check_sizes(settings.k, settings.fraction, len(forget))
    pool_rows, measured_rows = split_items(len(forget), settings.fraction, config.run.seed)
    pool = forget.iloc[pool_rows].reset_index(drop=True)
    measured = forget.iloc[measured_rows].reset_index(drop=True)
    if config.eval.max_items:
        measured = measured.iloc[:config.eval.max_items]
    shown = measured.assign(question=shown_questions(measured, pool, settings.k, config.run.seed))
    # The shots lengthen the prompt: the answer keeps the evaluation's budget (model.max_length past its
    # prompt), so k = 0 scores exactly as the evaluation does.
    added = max(len(prompt_ids(tokenizer, shown_question, config.eval.template))
                - len(prompt_ids(tokenizer, question, config.eval.template))
                for shown_question, question in zip(shown["question"], measured["question"]))
    max_length = config.model.max_length + added
    positions = position_limit(model)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"attack.in_context.k={settings.k}: the shown items add up to {added} tokens to a prompt, {max_length} in "
            f"all with model.max_length={config.model.max_length}; the model takes {positions} positions: lower "
            "attack.in_context.k"
        )
    setting = f"k={settings.k}"
    before = score(model, tokenizer, {"forget": measured}, config.eval, config.model.max_length)
    after = score(model, tokenizer, {"forget": shown}, config.eval, max_length)
    items = [phase_items(before, setting, "before"), phase_items(after, setting, "after")]
    frame = pd.DataFrame({"item_id": [*pool["item_id"], *measured["item_id"]],
                          "role": ["shown"] * len(pool) + ["measured"] * len(measured)})
    result = outcome("in_context", table_rows("in_context", setting, summarise(before), summarise(after)), items,
                     measured_items=len(measured), pool_items=len(pool), k=settings.k,
                     seconds=time.perf_counter() - started)
    result.files["in_context_items.parquet"] = frame
    return result
