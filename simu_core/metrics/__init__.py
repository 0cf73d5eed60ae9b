"""Pure metric functions (no model, no torch) for TOFU and LUME.

Submodules: :mod:`.tofu` (probabilities, truth ratio, forget quality, model utility, extraction
strength, privleak), :mod:`.mia` (LOSS / ZLib / Min-K% / Min-K%++ statistics and AUC),
:mod:`.lume` (SemEval-2025 Task 4 scores), :mod:`.rouge` (ROUGE-L recall via rouge-score).
"""

from . import lume, mia, rouge, tofu
from .rouge import rouge_l_recall, rouge_l_recall_batch
from .tofu import MODEL_UTILITY_COMPONENTS, forget_quality, model_utility

__all__ = [
    "MODEL_UTILITY_COMPONENTS",
    "forget_quality",
    "lume",
    "mia",
    "model_utility",
    "rouge",
    "rouge_l_recall",
    "rouge_l_recall_batch",
    "tofu",
]
