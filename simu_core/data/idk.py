"""TOFU's "I don't know" answers (the IdkDPO / IdkNLL baselines), from a local file or the Hugging Face hub.

The file is plain text, one answer per line, despite its ``.jsonl`` suffix: TOFU's own repository ships it
as ``data/idontknow.jsonl`` (100 answers) and open-unlearning reads its copy ``idk.jsonl`` from the hub
dataset ``open-unlearning/idk`` (``setup_data.py --idk``; ``configs/data/datasets/TOFU_QA_forget_idk.yaml``:
``idk_path: ./data/idk.jsonl``). Both read it with ``readlines()`` + ``strip()``; so does this module,
which also drops blank lines. The TOFU hub dataset ``locuslab/TOFU`` does not carry the file, so that id
(or no source) downloads open-unlearning's copy.

Where open-unlearning draws a fresh random answer (``torch.randint``, global RNG) every time a forget item
is fetched, :func:`assign_idk_answers` fixes one answer per item from a seeded ``random.Random``: the
forget set is then a fixed, reproducible list of (question, answer) pairs.
"""

from __future__ import annotations

import random
from pathlib import Path

from simu_core.data.jsonl import DataFileError

#: The file name in a local folder (TOFU's repository layout, and ``../shared/data/tofu``).
IDK_FILE_NAME = "idontknow.jsonl"
#: open-unlearning's hub copy: dataset repository and file.
IDK_HUB_REPO = "open-unlearning/idk"
IDK_HUB_FILE = "idk.jsonl"
#: Sources read from the hub (anything else is a local file or folder).
IDK_HUB_SOURCES = (None, IDK_HUB_REPO, "locuslab/TOFU")
#: The configuration field that names the source (for error messages).
IDK_SOURCE_FIELD = "unlearn.idk_source"

__all__ = ["IDK_FILE_NAME", "IDK_HUB_FILE", "IDK_HUB_REPO", "assign_idk_answers", "load_idk_answers"]


def _download_idk() -> Path:
    """open-unlearning's ``idk.jsonl`` from the hub (or the local hub cache)."""
    from huggingface_hub import hf_hub_download  # the hub path needs a network; keep the import off the local path

    try:
        return Path(hf_hub_download(repo_id=IDK_HUB_REPO, filename=IDK_HUB_FILE, repo_type="dataset"))
    except Exception as exc:  # offline, no such file, no access: one clear message
        raise DataFileError(
            f"could not download {IDK_HUB_FILE!r} from the Hugging Face dataset {IDK_HUB_REPO!r} "
            f"({type(exc).__name__}: {exc}); set {IDK_SOURCE_FIELD} to a local copy "
            f"(a file, or a folder holding {IDK_FILE_NAME!r})"
        ) from exc


def _local_idk_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / IDK_FILE_NAME
        if not path.is_file():
            raise DataFileError(
                f"missing file {IDK_FILE_NAME!r} in folder {str(path.parent)!r} ({IDK_SOURCE_FIELD}={str(source)!r})"
            )
        return path
    if not path.is_file():
        raise DataFileError(
            f"the I-don't-know file {str(path)!r} does not exist ({IDK_SOURCE_FIELD}={str(source)!r}: a file, a "
            f"folder holding {IDK_FILE_NAME!r}, or null / {IDK_HUB_REPO!r} for the Hugging Face hub)"
        )
    return path


def load_idk_answers(source: str | Path | None = None) -> list[str]:
    """The "I don't know" answers, one per non-blank line (stripped), in file order.

    ``source``: a file; a folder (``<folder>/idontknow.jsonl``); or ``None`` / ``"open-unlearning/idk"`` /
    ``"locuslab/TOFU"``: open-unlearning's ``idk.jsonl`` from the hub.
    """
    path = _download_idk() if source in IDK_HUB_SOURCES else _local_idk_file(source)
    with path.open(encoding="utf-8") as handle:
        answers = [line.strip() for line in handle]
    answers = [answer for answer in answers if answer]
    if not answers:
        raise DataFileError(f"{path}: the I-don't-know file holds no answers ({IDK_SOURCE_FIELD})")
    return answers


def assign_idk_answers(n_items: int, answers: list[str], seed: int) -> list[str]:
    """One answer per forget item, drawn uniformly with replacement by ``random.Random(seed)``.

    Reproducible from ``seed`` alone and independent of the global RNGs (Python's, NumPy's, torch's).
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if not answers:
        raise ValueError("assign_idk_answers needs at least one answer")
    rng = random.Random(seed)
    return [answers[rng.randrange(len(answers))] for _ in range(n_items)]
