"""JSON Lines reading with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


class DataFileError(ValueError):
    """A benchmark file is missing or malformed; the message names the file (and line)."""


def read_jsonl(path: str | Path, required_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSON Lines file; every row must be an object holding ``required_fields``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing file {path.name!r} in folder {str(path.parent)!r}")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{path}: line {line_number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}: line {line_number} is not a JSON object")
            missing = [field for field in required_fields if field not in row]
            if missing:
                raise DataFileError(
                    f"{path}: line {line_number} lacks field(s) {missing}; expected {list(required_fields)}"
                )
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: the file holds no rows")
    return rows
