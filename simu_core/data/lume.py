"""LUME (SemEval-2025 Task 4) from local files or the gated Hugging Face dataset.

Rows are parsed into ``task`` (Task1/2/3), ``kind`` (``completion`` for ids ending in ``sc<d>``,
``qa`` for ``qa<d>``) and ``split`` (forget/retain). No chat template: ``input`` is continued raw.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simu_core.data.jsonl import DataFileError, read_jsonl

LUME_HUB_ID = "llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public"
LUME_TASKS = ("Task1", "Task2", "Task3")
_ROW_FIELDS = ("id", "input", "output", "task")
_KIND_PATTERN = re.compile(r"(sc|qa)(\d+)$")
# The SemEval release's parquet layout: <folder>/data/<split>-00000-of-00001.parquet
_PARQUET_NAMES = {"forget": "forget", "retain": "retain"}


@dataclass
class LumeBenchmark:
    """LUME rows (id, input, output, task, kind, split) and the MIA documents."""

    rows: pd.DataFrame
    mia_member: pd.DataFrame
    mia_nonmember: pd.DataFrame

    def split(self, name: str) -> pd.DataFrame:
        """Rows of the ``forget`` or ``retain`` split."""
        if name not in ("forget", "retain"):
            raise ValueError(f"unknown LUME split {name!r}; expected 'forget' or 'retain'")
        return self.rows[self.rows["split"] == name].reset_index(drop=True)

    def sizes(self) -> dict[str, int]:
        """Row counts per split and MIA set."""
        counts = self.rows["split"].value_counts().to_dict()
        return {**counts, "mia_member": len(self.mia_member), "mia_nonmember": len(self.mia_nonmember)}


def parse_lume_rows(rows: list[dict], split: str, origin: str) -> pd.DataFrame:
    """Validate raw rows and add ``kind`` and ``split`` columns (errors name ``origin`` and row)."""
    parsed = []
    for number, row in enumerate(rows, start=1):
        missing = [field for field in _ROW_FIELDS if field not in row]
        if missing:
            raise DataFileError(f"{origin}: row {number} lacks field(s) {missing}; expected {list(_ROW_FIELDS)}")
        match = _KIND_PATTERN.search(str(row["id"]))
        if match is None:
            raise DataFileError(f"{origin}: row {number} id {row['id']!r} does not end in sc<d> or qa<d>")
        if row["task"] not in LUME_TASKS:
            raise DataFileError(f"{origin}: row {number} task {row['task']!r} is not one of {list(LUME_TASKS)}")
        kind = "completion" if match.group(1) == "sc" else "qa"
        parsed.append({**{field: row[field] for field in _ROW_FIELDS}, "kind": kind, "split": split})
    return pd.DataFrame(parsed)


def _read_split(folder: Path, split: str) -> tuple[list[dict], str]:
    jsonl = folder / f"{split}.jsonl"
    if jsonl.is_file():
        return read_jsonl(jsonl, required_fields=_ROW_FIELDS), str(jsonl)
    parquet = sorted((folder / "data").glob(f"{_PARQUET_NAMES[split]}-*.parquet")) if (folder / "data").is_dir() else []
    if parquet:
        frame = pd.concat([pd.read_parquet(path) for path in parquet], ignore_index=True)
        return frame.to_dict("records"), str(parquet[0])
    raise DataFileError(
        f"missing file {jsonl.name!r} (or data/{split}-*.parquet) in LUME folder {str(folder)!r}"
    )


def _read_mia(folder: Path, name: str) -> pd.DataFrame:
    path = folder / f"{name}.jsonl"
    return pd.DataFrame(read_jsonl(path, required_fields=("id", "document")))[["id", "document"]]


def load_lume(source: str | Path | None = None, token: str | None = None) -> LumeBenchmark:
    """LUME from a local folder, or from the gated hub dataset (token from ``HF_TOKEN``).

    A local folder holds ``forget.jsonl``, ``retain.jsonl``, ``mia_member.jsonl`` and
    ``mia_nonmember.jsonl`` (or the SemEval parquet layout ``data/forget-*.parquet``).
    """
    if source is None:
        token = token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if not token:
            raise DataFileError(
                f"LUME is gated on the Hugging Face hub ({LUME_HUB_ID}): set HF_TOKEN, or set "
                "data.source to a local folder of its files"
            )
        from huggingface_hub import snapshot_download

        source = snapshot_download(repo_id=LUME_HUB_ID, repo_type="dataset", token=token)
    folder = Path(source)
    if not folder.is_dir():
        raise DataFileError(f"LUME folder {str(folder)!r} does not exist")
    frames = []
    for split in ("forget", "retain"):
        rows, origin = _read_split(folder, split)
        frames.append(parse_lume_rows(rows, split, origin))
    return LumeBenchmark(
        rows=pd.concat(frames, ignore_index=True),
        mia_member=_read_mia(folder, "mia_member"),
        mia_nonmember=_read_mia(folder, "mia_nonmember"),
    )
