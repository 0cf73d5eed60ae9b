"""ROUGE-L recall exactly as open-unlearning (TOFU) and the LUME scorer compute it.

Both call ``rouge_score.rouge_scorer.RougeScorer([...], use_stemmer=True).score(target, prediction)``
with the gold text as *target* and the model generation as *prediction*, and keep
``scores["rougeL"].recall`` = LCS(gold, generation) / len(gold tokens). The default rouge-score
tokenizer lower-cases, drops non-alphanumeric characters and Porter-stems tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from ._validation import check_text


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # Same scorer configuration as open-unlearning's eval_text_similarity.
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(generation: str, reference: str) -> dict[str, float]:
    """ROUGE-1 recall, ROUGE-L F1 and ROUGE-L recall of ``generation`` against ``reference``.

    Keys match open-unlearning's per-item logs: ``rouge1_recall``, ``rougeL_f1``, ``rougeL_recall``.
    ``reference`` (the gold answer) must be non-blank; ``generation`` may be empty (scores 0).
    """
    check_text(generation, "generation")
    check_text(reference, "reference", allow_empty=False)
    s = _scorer().score(reference, generation)
    return {
        "rouge1_recall": float(s["rouge1"].recall),
        "rougeL_f1": float(s["rougeL"].fmeasure),
        "rougeL_recall": float(s["rougeL"].recall),
    }


def rouge_l_recall(generation: str, reference: str) -> float:
    """ROUGE-L recall (rouge-score, ``use_stemmer=True``) of ``generation`` against gold ``reference``."""
    return rouge_scores(generation, reference)["rougeL_recall"]


def check_pairs(generations: Sequence[str], references: Sequence[str]) -> None:
    """Paired per-item texts: two sequences (not single strings) of the same, non-zero length."""
    if isinstance(generations, str) or isinstance(references, str):
        raise TypeError("generations and references must be sequences of str, not a single str")
    if len(generations) == 0:
        raise ValueError("generations is empty")
    if len(generations) != len(references):
        raise ValueError(
            "generations and references must have the same length (one entry per item), "
            f"got {len(generations)} and {len(references)}"
        )


def rouge_l_recall_batch(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-item ROUGE-L recall for paired lists of generations and gold references."""
    check_pairs(generations, references)
    out: list[float] = []
    for i, (gen, ref) in enumerate(zip(generations, references)):
        check_text(gen, f"generations[{i}]")
        check_text(ref, f"references[{i}]", allow_empty=False)
        out.append(float(_scorer().score(ref, gen)["rougeL"].recall))
    return out


def mean_rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> float:
    """Mean over items of ROUGE-L recall: the TOFU 'ROUGE' metric."""
    vals = rouge_l_recall_batch(generations, references)
    return float(sum(vals) / len(vals))
