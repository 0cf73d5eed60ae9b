"""TOFU (Maini et al. 2024) from the Hugging Face dataset ``locuslab/TOFU`` or a local folder.

The local folder holds the hub's files, one per config, JSON Lines despite the ``.json`` suffix.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from simu_core.data.jsonl import DataFileError, read_jsonl
from simu_core.data.schema import QABenchmark, with_item_ids

TOFU_HUB_ID = "locuslab/TOFU"
QUESTIONS_PER_AUTHOR = 20

_QA = ("question", "answer")
_PERTURBED = ("question", "answer", "paraphrased_answer", "perturbed_answer")
# TOFU's perturbed files also hold a paraphrased question (the paraphrase attack's prompt); kept when present.
_PARAPHRASED_QUESTION = "paraphrased_question"
_OPTIONS = ("question", "answer", "perturbed_answer")
_MULTIPLE_CHOICE = ("question", "option1", "option2", "option3", "option4", "answer")

# Every TOFU config with its row count and required fields.
TOFU_CONFIGS: dict[str, tuple[int, tuple[str, ...]]] = {
    "full": (4000, _QA),
    "forget01": (40, _QA),
    "forget05": (200, _QA),
    "forget10": (400, _QA),
    "retain99": (3960, _QA),
    "retain95": (3800, _QA),
    "retain90": (3600, _QA),
    "forget01_perturbed": (40, _PERTURBED),
    "forget05_perturbed": (200, _PERTURBED),
    "forget10_perturbed": (400, _PERTURBED),
    "retain_perturbed": (400, _PERTURBED),
    "real_authors_perturbed": (100, _OPTIONS),
    "world_facts_perturbed": (117, _OPTIONS),
    "real_authors": (100, _MULTIPLE_CHOICE),
    "world_facts": (117, _MULTIPLE_CHOICE),
    "holdout01": (40, _QA),
    "holdout05": (200, _QA),
    "holdout10": (400, _QA),
}

# forget split -> (retain split, holdout split)
TOFU_PAIRING = {
    "forget01": ("retain99", "holdout01"),
    "forget05": ("retain95", "holdout05"),
    "forget10": ("retain90", "holdout10"),
}


def load_tofu_config(name: str, source: str | Path | None = None) -> pd.DataFrame:
    """One TOFU config as a DataFrame, from ``source`` (local folder) or the hub."""
    if name not in TOFU_CONFIGS:
        raise ValueError(f"unknown TOFU config {name!r}; known: {sorted(TOFU_CONFIGS)}")
    _, fields = TOFU_CONFIGS[name]
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise DataFileError(f"TOFU folder {str(folder)!r} does not exist")
        rows = read_jsonl(folder / f"{name}.json", required_fields=fields)
        return pd.DataFrame(rows)
    import datasets  # the hub path needs a network; keep the import off the local path

    dataset = datasets.load_dataset(TOFU_HUB_ID, name, split="train")
    frame = dataset.to_pandas()
    missing = [field for field in fields if field not in frame.columns]
    if missing:
        raise DataFileError(f"{TOFU_HUB_ID} config {name!r} lacks fields {missing}")
    return frame


def _with_paraphrased_question(frame: pd.DataFrame) -> list[str]:
    """The perturbed split's columns, with ``paraphrased_question`` where every row has one."""
    columns = list(_PERTURBED)
    if _PARAPHRASED_QUESTION in frame.columns and frame[_PARAPHRASED_QUESTION].map(
            lambda text: isinstance(text, str) and bool(text.strip())).all():
        columns.append(_PARAPHRASED_QUESTION)
    return columns


def load_tofu(
    split: str = "forget10", source: str | Path | None = None, retain_authors: int | None = None
) -> QABenchmark:
    """TOFU as a :class:`QABenchmark` for one forget split (forget01/05/10).

    ``retain_authors`` keeps the first N retain authors only (for small models and CPU runs);
    the retain evaluation set (``retain_perturbed`` = the first 20 authors) is cut to match.
    """
    if split not in TOFU_PAIRING:
        raise ValueError(f"unknown TOFU forget split {split!r}; expected one of {sorted(TOFU_PAIRING)}")
    retain_name, holdout_name = TOFU_PAIRING[split]
    retain = load_tofu_config(retain_name, source)
    retain_eval = load_tofu_config("retain_perturbed", source)
    if retain_authors is not None:
        retain = retain.iloc[: retain_authors * QUESTIONS_PER_AUTHOR]
        retain_eval = retain_eval.iloc[: retain_authors * QUESTIONS_PER_AUTHOR]
    forget = load_tofu_config(f"{split}_perturbed", source)
    forget_plain = load_tofu_config(split, source)
    if list(forget_plain["question"]) != list(forget["question"]):
        raise DataFileError(f"TOFU {split} and {split}_perturbed list different questions")
    train_target = pd.concat([retain[["question", "answer"]], forget_plain[["question", "answer"]]])
    splits = {
        "train_target": with_item_ids(train_target, "train"),
        "train_reference": with_item_ids(retain[["question", "answer"]], "train"),
        "forget": with_item_ids(forget[_with_paraphrased_question(forget)], "forget"),
        "retain": with_item_ids(retain[["question", "answer"]], "retain"),
        "retain_eval": with_item_ids(retain_eval[_with_paraphrased_question(retain_eval)], "retain"),
        "holdout": with_item_ids(load_tofu_config(holdout_name, source)[["question", "answer"]], "holdout"),
        "real_authors": with_item_ids(
            load_tofu_config("real_authors_perturbed", source)[list(_OPTIONS)], "real_authors"
        ),
        "world_facts": with_item_ids(
            load_tofu_config("world_facts_perturbed", source)[list(_OPTIONS)], "world_facts"
        ),
    }
    for column_split in ("forget", "retain_eval", "real_authors", "world_facts"):
        splits[column_split]["perturbed_answer"] = splits[column_split]["perturbed_answer"].map(list)
    return QABenchmark(name="tofu", forget_split=split, splits=splits)
