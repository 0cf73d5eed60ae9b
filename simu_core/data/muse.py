"""MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation") from the hub or a local folder.

Hub datasets ``muse-bench/MUSE-News`` and ``muse-bench/MUSE-Books``: subset = folder, split = file
name, fields ``text`` (``raw``, ``privleak``), ``prompt``/``gt`` (``verbmem``) and
``question``/``answer`` (``knowmem``). The benchmark authors' own data folder (``data/bbc`` of the
MUSE research repository, copied to ``/work/shared/data/muse/news``) names two files differently
from the hub splits, and the reference code's ``load_data.py`` writes the hub names back to disk,
so a local folder may use either name:

=============================  ==============================  ===========================
what                           local file(s), first found      hub (subset, split)
=============================  ==============================  ===========================
forget corpus                  ``raw/forget.json``             ``raw``, ``forget``
VerbMem (C1)                   ``verbmem/forget.json``         ``verbmem``, ``forget``
KnowMem forget (C2)            ``knowmem/forget_qa.json``      ``knowmem``, ``forget_qa``
KnowMem retain (C4)            ``knowmem/retain2_qa.json``,    ``knowmem``, ``retain_qa``
                               ``knowmem/retain_qa.json``
in-context examples            ``knowmem/{forget,retain2}_qa_icl.json`` (or ``retain_qa_icl``)
PrivLeak (C3) members          ``privleak/forget.json``        ``privleak``, ``forget``
PrivLeak non-members           ``privleak/holdout.json``       ``privleak``, ``holdout``
PrivLeak retain members        ``privleak/retain2.json``,      ``privleak``, ``retain``
                               ``privleak/retain.json``
=============================  ==============================  ===========================

The retain corpus (what a method trains on to keep utility) is chosen by ``retain_split``:
``retain1`` / ``retain2`` (``raw/retain{1,2}.json``, the benchmark's own retain corpora) or
``privleak/retain2`` (the 100 retain texts of the PrivLeak set: the only retain text in the local
folder). ``None`` leaves ``retain_chunks`` empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from simu_core.data.jsonl import DataFileError

MUSE_CORPORA = ("news", "books")
MUSE_HUB_IDS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
DEFAULT_RETAIN_SPLIT = "retain1"

# name -> (local candidates, first found wins; hub (subset, split)).
_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, str]]] = {
    "forget_chunks": (("raw/forget.json",), ("raw", "forget")),
    "verbmem_forget": (("verbmem/forget.json",), ("verbmem", "forget")),
    "knowmem_forget": (("knowmem/forget_qa.json",), ("knowmem", "forget_qa")),
    "knowmem_retain": (("knowmem/retain2_qa.json", "knowmem/retain_qa.json"), ("knowmem", "retain_qa")),
    "knowmem_forget_icl": (("knowmem/forget_qa_icl.json",), ("knowmem", "forget_qa_icl")),
    "knowmem_retain_icl": (
        ("knowmem/retain2_qa_icl.json", "knowmem/retain_qa_icl.json"),
        ("knowmem", "retain_qa_icl"),
    ),
    "privleak_forget": (("privleak/forget.json",), ("privleak", "forget")),
    "privleak_holdout": (("privleak/holdout.json",), ("privleak", "holdout")),
    "privleak_retain": (("privleak/retain2.json", "privleak/retain.json"), ("privleak", "retain")),
}

#: Values of ``retain_split`` -> (local candidates, hub (subset, split)).
RETAIN_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, str]]] = {
    "retain1": (("raw/retain1.json",), ("raw", "retain1")),
    "retain2": (("raw/retain2.json",), ("raw", "retain2")),
    "privleak/retain2": _SOURCES["privleak_retain"],
}
# Spellings of the same choices (file paths, hub split names).
_RETAIN_ALIASES = {"raw/retain1": "retain1", "raw/retain2": "retain2", "privleak/retain": "privleak/retain2"}

_FIELDS = {"verbmem": ("prompt", "gt"), "knowmem": ("question", "answer")}
_TEXT_LISTS = ("forget_chunks", "retain_chunks", "privleak_forget", "privleak_holdout", "privleak_retain")
_FRAMES = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "knowmem_forget_icl", "knowmem_retain_icl")
_SAVED_JSON = "muse.json"


@dataclass
class MuseBenchmark:
    """The MUSE files of one corpus (``corpus_name``: ``news`` or ``books``).

    ``verbmem_forget``: item_id, prompt, gt. ``knowmem_forget`` / ``knowmem_retain``: item_id,
    question, answer. ``knowmem_*_icl``: question, answer (the in-context examples). Text lists:
    the forget / retain corpora (``retain_chunks`` may be empty) and the PrivLeak sets.
    """

    corpus_name: str
    forget_chunks: list[str]
    retain_chunks: list[str]
    verbmem_forget: pd.DataFrame
    knowmem_forget: pd.DataFrame
    knowmem_retain: pd.DataFrame
    knowmem_forget_icl: pd.DataFrame
    knowmem_retain_icl: pd.DataFrame
    privleak_forget: list[str]
    privleak_holdout: list[str]
    privleak_retain: list[str]
    retain_split: str | None = field(default=None)

    def sizes(self) -> dict[str, int]:
        """Row count of every table and text list; ``forget`` / ``retain``: the forget and retain texts
        (non-blank) that unlearning reads (each is cut into windows of model.max_length tokens)."""
        counts = {name: len(getattr(self, name)) for name in (*_TEXT_LISTS, *_FRAMES)}
        return {**counts, "forget": sum(bool(text.strip()) for text in self.forget_chunks),
                "retain": sum(bool(text.strip()) for text in self.retain_chunks)}

    def corpus(self) -> list[str]:
        """Every text of the benchmark (corpora, prompts, continuations, questions, answers)."""
        texts = [text for name in _TEXT_LISTS for text in getattr(self, name)]
        texts += [*self.verbmem_forget["prompt"], *self.verbmem_forget["gt"]]
        for name in _FRAMES[1:]:
            frame = getattr(self, name)
            texts += [*frame["question"], *frame["answer"]]
        return [str(text) for text in texts]

    def save(self, folder: str | Path) -> None:
        """Write the tables as Parquet and the text lists (and corpus name) as ``muse.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _FRAMES:
            getattr(self, name).to_parquet(folder / f"{name}.parquet", index=False)
        payload = {"corpus_name": self.corpus_name, "retain_split": self.retain_split}
        payload.update({name: list(getattr(self, name)) for name in _TEXT_LISTS})
        (folder / _SAVED_JSON).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "MuseBenchmark":
        """Read a benchmark written by :meth:`save`."""
        folder = Path(folder)
        path = folder / _SAVED_JSON
        payload = _read_json(path)
        if not isinstance(payload, dict) or "corpus_name" not in payload:
            raise DataFileError(f"{path}: not a saved MUSE benchmark (no 'corpus_name')")
        missing = [name for name in _TEXT_LISTS if name not in payload]
        if missing:
            raise DataFileError(f"{path}: lacks field(s) {missing}")
        frames = {}
        for name in _FRAMES:
            parquet = folder / f"{name}.parquet"
            if not parquet.is_file():
                raise DataFileError(f"missing file {parquet.name!r} in folder {str(folder)!r}")
            frames[name] = pd.read_parquet(parquet)
        return cls(
            corpus_name=payload["corpus_name"],
            retain_split=payload.get("retain_split"),
            **{name: list(payload[name]) for name in _TEXT_LISTS},
            **frames,
        )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataFileError(f"missing file {path.name!r} in folder {str(path.parent)!r}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _check_string(value: Any, origin: str, number: int, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFileError(f"{origin}: row {number} field {name!r} must be a non-empty string, got {value!r}")
    return value


def _parse_texts(rows: Any, origin: str, allow_blank: bool = False) -> list[str]:
    """A list of texts: JSON strings (local files) or ``{"text": ...}`` rows (hub).

    ``allow_blank`` keeps empty strings: the published raw forget corpus of MUSE-News holds one
    (``raw/forget.json`` row 821), kept so that row counts match the benchmark's.
    """
    if not isinstance(rows, list):
        raise DataFileError(f"{origin}: expected a JSON list of texts, got {type(rows).__name__}")
    if not rows:
        raise DataFileError(f"{origin}: the list is empty")
    texts = []
    for number, row in enumerate(rows):
        if isinstance(row, dict):
            if "text" not in row:
                raise DataFileError(f"{origin}: row {number} lacks field 'text'")
            row = row["text"]
        if allow_blank and isinstance(row, str):
            texts.append(row)
            continue
        texts.append(_check_string(row, origin, number, "text"))
    return texts


def _parse_records(rows: Any, fields: tuple[str, ...], origin: str) -> pd.DataFrame:
    """A list of objects holding ``fields`` (extra keys are dropped)."""
    if not isinstance(rows, list):
        raise DataFileError(f"{origin}: expected a JSON list of objects, got {type(rows).__name__}")
    if not rows:
        raise DataFileError(f"{origin}: the list is empty")
    records = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFileError(f"{origin}: row {number} is not a JSON object")
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataFileError(f"{origin}: row {number} lacks field(s) {missing}; expected {list(fields)}")
        records.append({name: _check_string(row[name], origin, number, name) for name in fields})
    return pd.DataFrame(records, columns=list(fields))


class _Reader:
    """Reads one logical file from a local folder or the hub, returning (rows, origin)."""

    def __init__(self, corpus: str, source: str | Path | None, token: str | None) -> None:
        self.hub_id = MUSE_HUB_IDS[corpus]
        self.folder = None if source is None else Path(source)
        self.token = token
        if self.folder is not None and not self.folder.is_dir():
            raise DataFileError(f"MUSE folder {str(self.folder)!r} does not exist")

    def present(self, candidates: tuple[str, ...]) -> bool:
        return self.folder is not None and any((self.folder / name).is_file() for name in candidates)

    def read(self, candidates: tuple[str, ...], hub: tuple[str, str], what: str) -> tuple[Any, str]:
        if self.folder is None:
            return self._read_hub(*hub)
        for name in candidates:
            path = self.folder / name
            if path.is_file():
                return _read_json(path), str(path)
        also = f" (or {', '.join(repr(name) for name in candidates[1:])})" if len(candidates) > 1 else ""
        raise DataFileError(f"missing file {candidates[0]!r}{also} ({what}) in MUSE folder {str(self.folder)!r}")

    def _read_hub(self, subset: str, split: str) -> tuple[Any, str]:
        import datasets  # lazy: only the hub path needs it

        origin = f"{self.hub_id} (subset {subset!r}, split {split!r})"
        try:
            data = datasets.load_dataset(self.hub_id, subset, split=split, token=self.token)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes a message naming the split
            raise DataFileError(f"could not read {origin} from the Hugging Face hub: {exc}") from exc
        return [dict(row) for row in data], origin


def _normalise_retain_split(retain_split: str | None) -> str | None:
    if retain_split is None:
        return None
    name = _RETAIN_ALIASES.get(retain_split, retain_split)
    if name not in RETAIN_SPLITS:
        raise DataFileError(
            f"unknown MUSE retain_split {retain_split!r}; expected one of {list(RETAIN_SPLITS)} or None"
        )
    return name


def load_muse(
    corpus: str,
    source: str | Path | None = None,
    retain_split: str | None = DEFAULT_RETAIN_SPLIT,
    token: str | None = None,
) -> MuseBenchmark:
    """MUSE ``corpus`` (``news`` / ``books``) from the hub (``source`` None) or a local folder.

    ``retain_split`` picks the retain corpus (see the module docstring); a missing file is a
    :class:`DataFileError` naming it and the retain files the folder does hold.
    """
    if corpus not in MUSE_CORPORA:
        raise DataFileError(f"unknown MUSE corpus {corpus!r}; expected one of {list(MUSE_CORPORA)}")
    split_name = _normalise_retain_split(retain_split)
    reader = _Reader(corpus, source, token)

    parsed: dict[str, Any] = {}
    for name, (candidates, hub) in _SOURCES.items():
        rows, origin = reader.read(candidates, hub, name)
        kind = name.split("_")[0]
        if kind in _FIELDS:
            parsed[name] = _parse_records(rows, _FIELDS[kind], origin)
        else:
            # Raw corpora are training text (blank chunks allowed); PrivLeak texts are scored.
            parsed[name] = _parse_texts(rows, origin, allow_blank=name == "forget_chunks")

    retain_chunks: list[str] = []
    if split_name is not None:
        candidates, hub = RETAIN_SPLITS[split_name]
        if reader.folder is not None and not reader.present(candidates):
            available = [key for key, (names, _) in RETAIN_SPLITS.items() if reader.present(names)]
            raise DataFileError(
                f"missing file {candidates[0]!r} in MUSE folder {str(reader.folder)!r}, needed by "
                f"retain_split={retain_split!r}; retain corpora present here: {available or 'none'} "
                "(or retain_split=None for no retain corpus)"
            )
        rows, origin = reader.read(candidates, hub, f"retain corpus {split_name}")
        retain_chunks = _parse_texts(rows, origin, allow_blank=hub[0] == "raw")

    for name in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        frame = parsed[name]
        frame.insert(0, "item_id", [f"{name}-{index}" for index in range(len(frame))])
    return MuseBenchmark(corpus_name=corpus, retain_chunks=retain_chunks, retain_split=split_name, **parsed)
