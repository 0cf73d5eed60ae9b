"""MUSE metrics (Shi et al. 2024) as the benchmark's reference code computes them.

Reference: ``swj0419/muse_bench`` ``eval.py``, ``constants.py`` and ``metrics/{verbmem,knowmem,
privleak,logger}.py`` (its metrics files read from verbatim copies in ``Ali-E/muse_rep`` and
``zzwjames/FailureLLMUnlearning``; identical to the research code in ``jaechan-repo/muse_bench``
``verbmem/get_rouge.py``, ``knowmem/get_rouge_qa.py``, ``privleak/get_ppl_utils.py``).

- VerbMem / KnowMem: mean over items of ROUGE-L **F1** (``agg['mean_rougeL']``, where the logger
  stores ``score['rougeL'].fmeasure``), rouge-score with ``use_stemmer=False``, gold as target.
  :mod:`simu_core.metrics.rouge` scores with ``use_stemmer=True`` (open-unlearning / TOFU), which
  merges inflections ("reports" = "report"), so it is not reused: a second scorer lives here.
  MUSE's ``eval.py`` reports these ×100; the functions here return fractions in [0, 1].
- Min-K% Prob (``metrics/privleak.py`` ``inference``): ``-mean`` of the lowest
  ``int(len * k)`` token log-probs, k = 0.4 (the ``forget_holdout_Min-40%`` key). Unlike
  :func:`simu_core.metrics.mia.min_k_statistic` (and open-unlearning) there is no
  ``max(1, ...)``: MUSE takes the mean of an empty slice (NaN) for texts under ``1/k`` tokens;
  :func:`min_k_statistic` raises there instead of returning NaN.
- PrivLeak AUC (``sweep``: ``roc_curve(y, -stat)`` with forget labelled 0, holdout 1):
  ``P(stat(forget) > stat(holdout)) + 0.5 P(tie)``, i.e. the probability that a forget text looks
  *less* familiar than a holdout text. This is ``1 - `` :func:`simu_core.metrics.mia.auc`
  (open-unlearning's ``mia_auc`` orientation, which open-unlearning's ``privleak`` flips with
  ``1 - auc`` for the same reason). A memorising model scores near 0, a retrained one near 0.5.
- PrivLeak: ``(AUC - AUC_retrain) / AUC_retrain * 100``: negative = under-unlearned (the forget
  set still looks like training data), positive = over-unlearned.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike
from rouge_score import rouge_scorer

from . import mia as _mia
from .rouge import check_pairs
from ._validation import as_float_array, check_scalar, check_text

#: Min-K% fraction of PrivLeak: eval.py ``privleak_auc_key='forget_holdout_Min-40%'``.
PRIVLEAK_K = 0.4

#: MUSE's retrained-model (Llama-2-7B trained without the forget set) Min-40% AUCs:
#: constants.py ``AUC_RETRAIN[corpus]['forget_holdout_Min-40%']``. Only meaningful for that
#: model family; pass a reference you measured yourself for any other model.
MUSE_RETRAIN_PRIVLEAK_AUC = {"news": 0.47719999999999996, "books": 0.5392999999999999}

#: The logger's scorer: metrics/logger.py ``RougeScorer([...], use_stemmer=False)``.
ROUGE_USE_STEMMER = False


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ROUGE_USE_STEMMER)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``, which MUSE applies when it decodes
    (``batch_decode(..., clean_up_tokenization_spaces=True)``); recent transformers skip it for BPE
    tokenizers such as Llama's, so it is applied explicitly to match MUSE's texts."""
    check_text(text, "text")
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )


def rouge_l(generation: str, reference: str) -> dict[str, float]:
    """ROUGE-L F1 (MUSE's score) and recall (logged by MUSE) of ``generation`` vs gold ``reference``.

    A reference without words scores 0, as in MUSE: a VerbMem gold text cut at very few tokens can
    be empty (the cut counts BOS), and MUSE scores it rather than failing.
    """
    check_text(generation, "generation")
    check_text(reference, "reference")
    score = _scorer().score(reference, generation)["rougeL"]
    return {"rougeL_f1": float(score.fmeasure), "rougeL_recall": float(score.recall)}


def rouge_l_f1_batch(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-item ROUGE-L F1 (no stemming) for paired generations and gold texts."""
    check_pairs(generations, references)
    return [rouge_l(gen, ref)["rougeL_f1"] for gen, ref in zip(generations, references)]


def verbmem(generations: Sequence[str], references: Sequence[str]) -> float:
    """VerbMem: mean ROUGE-L F1 of the continuations against the (token-cut) true continuations."""
    return float(np.mean(rouge_l_f1_batch(generations, references)))


def knowmem(generations: Sequence[str], answers: Sequence[str]) -> float:
    """KnowMem: mean ROUGE-L F1 of the (stop-string-cut) answers against the gold answers."""
    return float(np.mean(rouge_l_f1_batch(generations, answers)))


def min_k_statistic(token_logprobs: ArrayLike, k: float = PRIVLEAK_K) -> float:
    """MUSE's Min-K% statistic: ``-mean`` of the lowest ``int(len * k)`` token log-probs.

    Raises where MUSE would average an empty slice (``int(len * k) == 0``).
    """
    lp = as_float_array(token_logprobs, "token_logprobs")
    k = check_scalar(k, "k", lo=0.0, hi=1.0)
    count = int(len(lp) * k)
    if count == 0:
        raise ValueError(
            f"Min-K% with k={k} needs at least {int(np.ceil(1 / k)) if k > 0 else 'more'} token log-probs, "
            f"got {len(lp)} (MUSE's int(len * k) keeps none and its mean is NaN)"
        )
    # The same sort-and-average as simu's Min-K% once at least one token is kept.
    return _mia.min_k_statistic(lp, k)


def privleak_auc(forget_scores: ArrayLike, holdout_scores: ArrayLike) -> float:
    """MUSE's AUC: ``P(forget statistic > holdout statistic) + 0.5 P(tie)`` (statistic: Min-K%).

    Equals sklearn ``roc_curve(y, -stat)`` + ``auc`` with forget labelled 0 and holdout 1, as in
    MUSE's ``sweep``; computed as :func:`simu_core.metrics.mia.auc` with the sets swapped.
    """
    return _mia._auc(holdout_scores, forget_scores, "holdout_scores", "forget_scores")


def privleak(auc: float, reference_auc: float) -> float:
    """PrivLeak in percent: ``(auc - reference_auc) / reference_auc * 100``."""
    auc = check_scalar(auc, "auc", lo=0.0, hi=1.0)
    reference_auc = check_scalar(reference_auc, "reference_auc", lo=0.0, hi=1.0)
    if reference_auc == 0.0:
        raise ValueError("reference_auc must be > 0: PrivLeak divides by it")
    return (auc - reference_auc) / reference_auc * 100.0
