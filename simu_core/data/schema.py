"""The shared shape of QA unlearning benchmarks (TOFU and the built-in synthetic one).

Every split is a pandas DataFrame with TOFU's field names plus ``item_id``:
``question, answer`` and, for evaluation splits, ``paraphrased_answer`` and ``perturbed_answer``
(a list of wrong answers: 5 for forget/retain, 3 for real authors / world facts). The forget and
retain evaluation splits may also hold ``paraphrased_question`` (TOFU's files and the built-in
benchmark do): the paraphrase attack reads it and refuses a benchmark without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

#: The optional column of the forget and retain evaluation splits the paraphrase attack asks.
PARAPHRASED_QUESTION = "paraphrased_question"

# Splits written by prepare_data, with the columns each must have.
SPLIT_COLUMNS: dict[str, tuple[str, ...]] = {
    "train_target": ("item_id", "question", "answer"),
    "train_reference": ("item_id", "question", "answer"),
    "forget": ("item_id", "question", "answer", "paraphrased_answer", "perturbed_answer"),
    "retain": ("item_id", "question", "answer"),
    "retain_eval": ("item_id", "question", "answer", "paraphrased_answer", "perturbed_answer"),
    "holdout": ("item_id", "question", "answer"),
    "real_authors": ("item_id", "question", "answer", "perturbed_answer"),
    "world_facts": ("item_id", "question", "answer", "perturbed_answer"),
}


@dataclass
class QABenchmark:
    """A TOFU-shaped benchmark: training sets, the forget/retain pairing and the evaluation sets.

    ``train_target`` is what the target model is fine-tuned on (forget + retain, plus general facts
    for the synthetic benchmark); ``train_reference`` is the retain model's training set (no forget
    items). ``forget`` and ``retain`` are what unlearning reads; the rest is evaluation.
    """

    name: str
    forget_split: str
    splits: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, columns in SPLIT_COLUMNS.items():
            if split not in self.splits:
                raise ValueError(f"benchmark {self.name!r} lacks split {split!r}")
            frame = self.splits[split]
            missing = [column for column in columns if column not in frame.columns]
            if missing:
                raise ValueError(f"benchmark {self.name!r}, split {split!r} lacks columns {missing}")
            if frame.empty:
                raise ValueError(f"benchmark {self.name!r}, split {split!r} is empty")

    def __getitem__(self, split: str) -> pd.DataFrame:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; known: {sorted(self.splits)}")
        return self.splits[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)

    def has_paraphrased_questions(self) -> bool:
        """Whether every forget item has a paraphrased question (what the paraphrase attack asks)."""
        forget = self.splits["forget"]
        return PARAPHRASED_QUESTION in forget.columns and bool(forget[PARAPHRASED_QUESTION].map(
            lambda text: isinstance(text, str) and bool(text.strip())).all())

    def sizes(self) -> dict[str, int]:
        """Row count of every split."""
        return {split: len(frame) for split, frame in self.splits.items()}

    def corpus(self) -> list[str]:
        """Every text of the benchmark (questions, answers, paraphrases, perturbed answers)."""
        texts: list[str] = []
        for frame in self.splits.values():
            for column in ("question", "answer", "paraphrased_answer"):
                if column in frame.columns:
                    texts.extend(frame[column].astype(str))
            if "perturbed_answer" in frame.columns:
                texts.extend(text for options in frame["perturbed_answer"] for text in options)
        return texts

    def save(self, folder: str | Path) -> None:
        """Write one Parquet file per split (lists stay lists) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for split, frame in self.splits.items():
            frame.to_parquet(folder / f"{split}.parquet", index=False)
        (folder / "benchmark.txt").write_text(f"{self.name}\n{self.forget_split}\n")

    @classmethod
    def load(cls, folder: str | Path) -> "QABenchmark":
        """Read a benchmark written by :meth:`save`."""
        folder = Path(folder)
        name, forget_split = (folder / "benchmark.txt").read_text().split()[:2]
        splits = {}
        for split in SPLIT_COLUMNS:
            frame = pd.read_parquet(folder / f"{split}.parquet")
            if "perturbed_answer" in frame.columns:
                frame["perturbed_answer"] = frame["perturbed_answer"].map(list)
            splits[split] = frame
        return cls(name=name, forget_split=forget_split, splits=splits)


def with_item_ids(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Return ``frame`` with a stable ``item_id`` column ``<prefix>-<row>`` in first position."""
    frame = frame.reset_index(drop=True).copy()
    frame.insert(0, "item_id", [f"{prefix}-{index}" for index in range(len(frame))])
    return frame
