"""Paraphrase attack: the forget questions asked in other words (Lynch et al., arXiv 2402.16835).

A method that only learned to refuse the exact training question leaves the answer reachable from a
paraphrase. The forget items are measured with their own question (before) and with the benchmark's
paraphrased question (after): TOFU's ``paraphrased_question``, the built-in benchmark's second
question template. A benchmark without paraphrased questions is refused; none are invented.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.attacks.measures import AttackOutcome, measured_splits, outcome, phase_items, score, summarise, table_rows
from simu_core.config import SimuConfig
from simu_core.data.schema import PARAPHRASED_QUESTION, QABenchmark

SETTING = "paraphrased"


def check_paraphrases(benchmark: QABenchmark) -> None:
    """Refuse a benchmark whose forget items lack paraphrased questions (naming the benchmark)."""
    if not benchmark.has_paraphrased_questions():
        raise ValueError(
            f"attacks=[paraphrase]: benchmark {benchmark.name!r} has no paraphrased question for every forget item "
            f"(column {PARAPHRASED_QUESTION!r}); the attack asks the benchmark's own paraphrases and invents none"
        )


def paraphrased(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each question replaced by its paraphrase (answers unchanged)."""
    return frame.assign(question=frame[PARAPHRASED_QUESTION])


def run(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: QABenchmark,
        config: SimuConfig) -> AttackOutcome:
    """Forget measures with the original and with the paraphrased questions."""
    check_paraphrases(benchmark)
    started = time.perf_counter()
    forget = measured_splits(benchmark, config, retain=False)["forget"]
    max_length = config.model.max_length
    before = score(model, tokenizer, {"forget": forget}, config.eval, max_length)
    after = score(model, tokenizer, {"forget": paraphrased(forget)}, config.eval, max_length)
    return outcome("paraphrase", table_rows("paraphrase", SETTING, summarise(before), summarise(after)),
                   [phase_items(before, SETTING, "before"), phase_items(after, SETTING, "after")],
                   measured_items=len(forget), seconds=time.perf_counter() - started)
