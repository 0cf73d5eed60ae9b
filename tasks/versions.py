"""Code versions of the stages: a hash of the library code each stage runs.

Prefect's TASK_SOURCE sees only a task function's own text, so each task also takes the hash of
the ``simu_core`` modules behind it; editing them invalidates that stage (and, through the input
keys, every stage after it).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_CORE = Path(__file__).resolve().parents[1] / "simu_core"
_DATA = Path(__file__).resolve().parents[1] / "data"
_SHARED = ("config.py", "stages.py", "prompting.py", "scoring.py", "models", "data/schema.py")

STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data", "models/tiny.py", "../data/synthetic"),
    "train_target": ("finetune.py", "models"),
    "train_retain_reference": ("finetune.py", "models"),
    "attribute": ("attribution.py",),
    "threshold_mask": ("thresholding.py", "masking.py"),
    "unlearn": ("unlearning", "optim", "masking.py"),
    "evaluate": ("evaluation", "metrics"),
}


def _files(relative: str) -> list[Path]:
    path = (_CORE / relative).resolve()
    if path.is_dir():
        # Library code, and the vocabularies/templates the synthetic benchmark is generated from.
        return sorted(file for file in path.rglob("*") if file.suffix in (".py", ".yaml"))
    return [path] if path.exists() else []


@lru_cache(maxsize=None)
def stage_code_version(stage: str) -> str:
    """sha256 (first 16 hex) over the source (and shipped data) files a stage depends on."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; known: {sorted(STAGE_MODULES)}")
    digest = hashlib.sha256(stage.encode())
    for relative in (*_SHARED, *STAGE_MODULES[stage]):
        for file in _files(relative):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
