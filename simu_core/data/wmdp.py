"""WMDP (Li et al. 2024, "The WMDP Benchmark"): multiple-choice questions and unlearning corpora.

Questions (one subset of ``bio``, ``chem``, ``cyber``) come from the hub or local files; the corpora
(what RMU forgets and retains) from the hub or a local folder. Every error is a
:class:`~simu_core.data.jsonl.DataFileError` naming the file, the line or row, and the field.

Sources verified (search tool, public copies; read, not executed):

- Questions: hub dataset ``cais/wmdp``, configs ``wmdp-bio`` / ``wmdp-chem`` / ``wmdp-cyber``, split
  ``test`` (files ``wmdp-<subset>/test-00000-of-00001.parquet``), features ``question`` (string),
  ``choices`` (sequence of strings, 4 per question), ``answer`` (int64 option index); the dataset
  card's current counts are 1,273 / 408 / 1,987 (the harness README still says 1,520 / 412 / 2,225,
  counts of an earlier upload). lm-evaluation-harness ``lm_eval/tasks/wmdp/_default_template_yaml``
  reads ``dataset_path: cais/wmdp``, ``test_split: test``, and ``wmdp_<subset>.yaml`` sets
  ``dataset_name: wmdp-<subset>``.
- Corpora: hub dataset ``cais/wmdp-corpora`` with configs ``bio-retain-corpus`` (60,887 rows),
  ``cyber-forget-corpus`` (1,000), ``cyber-retain-corpus`` (4,473), split ``train``, one feature
  ``text``. Its card says: "The bio forget corpus must be requested separately" through a Google
  form (:data:`WMDP_BIO_FORGET_FORM`); the hub also lists a gated ``cais/wmdp-bio-forget-corpus``,
  whose access is granted on request. Nothing is published for chem.
- RMU (``rmu/unlearn.py`` / ``get_data`` in copies of ``centerforaisafety/wmdp``) reads
  ``data/<name>.jsonl`` with names ``bio-forget-corpus``, ``cyber-forget-corpus``, ...: for the bio
  forget corpus each line is an object whose ``text`` it takes; for the others it takes each raw
  line. The local corpora layout below uses the same file names, so that ``data/`` folder works
  as ``corpora_source``.

Local layouts:

- questions, ``source``: a JSON Lines file (one object per line with ``question``, ``choices``,
  ``answer``), or a folder in the hub's Parquet layout ``<folder>/wmdp-<subset>/test-*.parquet``
  (e.g. a ``huggingface_hub.snapshot_download`` of ``cais/wmdp``);
- corpora, ``corpora_source``: a folder with ``<subset>-forget-corpus.jsonl`` and
  ``<subset>-retain-corpus.jsonl``, each line ``{"text": "..."}`` or a bare JSON string (one
  document per line; blank lines skipped).

Rows in errors: ``line N`` (1-based) in JSON Lines files, ``row N`` (0-based, as ``iloc``) in
Parquet files and hub datasets.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from simu_core.data.jsonl import DataFileError
from simu_core.data.schema import with_item_ids

WMDP_SUBSETS = ("bio", "chem", "cyber")
WMDP_HUB_ID = "cais/wmdp"
WMDP_SPLIT = "test"
WMDP_CORPORA_HUB_ID = "cais/wmdp-corpora"
WMDP_CORPORA_SPLIT = "train"
#: The form through which the WMDP authors share the bio forget corpus (from the cais/wmdp-corpora card).
WMDP_BIO_FORGET_FORM = (
    "https://docs.google.com/forms/d/e/1FAIpQLSdnQc8Qn0ozSDu3VE8HLoHPvhpukX1t1dIwE5K5rJw9lnOjKw/viewform"
)
#: The gated hub copy of the bio forget corpus (access on request); not read by this loader.
WMDP_BIO_FORGET_HUB_ID = "cais/wmdp-bio-forget-corpus"
QUESTION_FIELDS = ("question", "choices", "answer")
QUESTION_COLUMNS = ("item_id", "question", "choices", "answer")
CORPUS_ROLES = ("forget", "retain")
#: The (subset, role) corpora published on ``cais/wmdp-corpora`` (the bio forget corpus is not).
HUB_CORPORA = {("bio", "retain"), ("cyber", "forget"), ("cyber", "retain")}
_INFO_FILE = "wmdp.json"


def check_subset(subset: str) -> str:
    """Return ``subset`` if it is a WMDP subset, else raise naming the allowed ones."""
    if subset not in WMDP_SUBSETS:
        raise DataFileError(f"unknown WMDP subset {subset!r}; expected one of {list(WMDP_SUBSETS)}")
    return subset


def hub_config(subset: str) -> str:
    """The ``cais/wmdp`` config of ``subset`` (``wmdp-bio`` ...)."""
    return f"wmdp-{check_subset(subset)}"


def corpus_name(subset: str, role: str) -> str:
    """``<subset>-<role>-corpus``: the ``cais/wmdp-corpora`` config and the local file's stem."""
    if role not in CORPUS_ROLES:
        raise ValueError(f"unknown corpus role {role!r}; expected one of {list(CORPUS_ROLES)}")
    return f"{check_subset(subset)}-{role}-corpus"


@dataclass
class WMDPBenchmark:
    """One WMDP subset: its questions and (optionally) its forget and retain corpora.

    ``questions`` has columns ``item_id, question, choices`` (list of option texts) and ``answer``
    (the gold option's index). The corpora are lists of documents, empty when not loaded.
    """

    subset: str
    questions: pd.DataFrame
    forget_corpus: list[str] = field(default_factory=list)
    retain_corpus: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_subset(self.subset)
        missing = [column for column in QUESTION_COLUMNS if column not in self.questions.columns]
        if missing:
            raise ValueError(f"WMDP {self.subset} questions lack column(s) {missing}")
        if self.questions.empty:
            raise ValueError(f"WMDP {self.subset} holds no questions")

    @property
    def num_choices(self) -> int:
        """Options per question (4 in the published data; equal for every question)."""
        return len(self.questions["choices"].iloc[0])

    def sizes(self) -> dict[str, int]:
        """Counts of questions and corpus documents."""
        return {
            "questions": len(self.questions),
            "forget_corpus": len(self.forget_corpus),
            "retain_corpus": len(self.retain_corpus),
            # What unlearning reads (each document is cut into windows of model.max_length tokens).
            "forget": len(self.forget_corpus),
            "retain": len(self.retain_corpus),
        }

    def corpus(self) -> list[str]:
        """Every text (questions, options, corpus documents): what a tokenizer is trained on."""
        texts = list(self.questions["question"])
        texts.extend(choice for choices in self.questions["choices"] for choice in choices)
        return texts + list(self.forget_corpus) + list(self.retain_corpus)

    def save(self, folder: str | Path) -> None:
        """Write ``questions.parquet``, ``forget_corpus.parquet``, ``retain_corpus.parquet`` and ``wmdp.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.questions[list(QUESTION_COLUMNS)].to_parquet(folder / "questions.parquet", index=False)
        for role, texts in (("forget", self.forget_corpus), ("retain", self.retain_corpus)):
            # An explicit string column: an empty corpus still round-trips with its schema.
            pd.DataFrame({"text": pd.Series(list(texts), dtype="object")}).to_parquet(
                folder / f"{role}_corpus.parquet", index=False
            )
        (folder / _INFO_FILE).write_text(json.dumps({"subset": self.subset, "sizes": self.sizes()}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "WMDPBenchmark":
        """Read a benchmark written by :meth:`save`."""
        folder = Path(folder)
        info_path = folder / _INFO_FILE
        if not info_path.is_file():
            raise DataFileError(f"missing file {_INFO_FILE!r} in WMDP folder {str(folder)!r}")
        subset = json.loads(info_path.read_text())["subset"]
        questions = pd.read_parquet(folder / "questions.parquet")
        # Parquet gives numpy arrays and numpy ints back: restore the documented Python types.
        questions["choices"] = questions["choices"].map(lambda options: [str(option) for option in options])
        questions["answer"] = questions["answer"].astype(int)
        corpora = {
            role: [str(text) for text in pd.read_parquet(folder / f"{role}_corpus.parquet")["text"]]
            for role in CORPUS_ROLES
        }
        return cls(subset=subset, questions=questions, forget_corpus=corpora["forget"], retain_corpus=corpora["retain"])


# ---------------------------------------------------------------- questions


def _is_option_list(value: Any) -> bool:
    # Parquet and the hub give numpy arrays, JSON gives lists.
    return isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(option, str) for option in value)


def parse_wmdp_questions(rows: Iterable[tuple[str, Any]], subset: str, origin: str) -> pd.DataFrame:
    """Validate ``(where, row)`` pairs (``where``: ``"line 3"``/``"row 2"``) into the questions frame.

    Every question needs ``question`` (a string), ``choices`` (a list of at least 2 strings, as many
    as the first question's) and ``answer`` (an integer index into ``choices``).
    """
    parsed: list[dict[str, Any]] = []
    expected_choices: int | None = None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataFileError(f"{origin}: {where} is not a JSON object")
        missing = [name for name in QUESTION_FIELDS if name not in row]
        if missing:
            raise DataFileError(f"{origin}: {where} lacks field(s) {missing}; expected {list(QUESTION_FIELDS)}")
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str):
            raise DataFileError(f"{origin}: {where} field 'question' must be a string, got {type(question).__name__}")
        if not _is_option_list(choices):
            raise DataFileError(f"{origin}: {where} field 'choices' must be a list of strings, got {choices!r}")
        choices = [str(option) for option in choices]
        if expected_choices is None:
            if len(choices) < 2:
                raise DataFileError(f"{origin}: {where} field 'choices' has {len(choices)} option(s); at least 2 are needed")
            expected_choices = len(choices)
        elif len(choices) != expected_choices:
            raise DataFileError(
                f"{origin}: {where} field 'choices' has {len(choices)} options, but the file's first question has "
                f"{expected_choices}"
            )
        # bool is an int subclass, and a float index (1.0) hides a broken column: both refused.
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
            raise DataFileError(f"{origin}: {where} field 'answer' must be an integer option index, got {answer!r}")
        if not 0 <= int(answer) < len(choices):
            raise DataFileError(
                f"{origin}: {where} field 'answer' is {int(answer)}, outside 0..{len(choices) - 1} "
                f"(the indices of its {len(choices)} choices)"
            )
        parsed.append({"question": question, "choices": choices, "answer": int(answer)})
    if not parsed:
        raise DataFileError(f"{origin}: the file holds no questions")
    return with_item_ids(pd.DataFrame(parsed, columns=list(QUESTION_FIELDS)), f"wmdp-{subset}")


def _json_lines(path: Path) -> Iterable[tuple[str, Any]]:
    """``("line N", value)`` for every non-blank line of a JSON Lines file (any JSON value)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None


def _frame_rows(frame: pd.DataFrame) -> Iterable[tuple[str, dict[str, Any]]]:
    return ((f"row {index}", record) for index, record in enumerate(frame.to_dict("records")))


def _read_question_parquet(folder: Path, subset: str) -> pd.DataFrame:
    subset_folder = folder / hub_config(subset)
    files = sorted(subset_folder.glob(f"{WMDP_SPLIT}-*.parquet")) if subset_folder.is_dir() else []
    if not files:
        raise DataFileError(
            f"missing file {hub_config(subset)}/{WMDP_SPLIT}-*.parquet in WMDP folder {str(folder)!r}: a folder "
            f"source must be in the {WMDP_HUB_ID} Parquet layout (else pass a JSON Lines file)"
        )
    frames = []
    for path in files:
        frame = pd.read_parquet(path)
        # A missing column is named per file, before rows are concatenated.
        missing = [name for name in QUESTION_FIELDS if name not in frame.columns]
        if missing:
            raise DataFileError(f"{path}: lacks field(s) {missing}; expected {list(QUESTION_FIELDS)}")
        frames.append((path, frame))
    if len(frames) == 1:
        path, frame = frames[0]
        return parse_wmdp_questions(_frame_rows(frame), subset, str(path))
    # Several shards: validate each (errors name its file), then renumber the items.
    parts = [parse_wmdp_questions(_frame_rows(frame), subset, str(path)) for path, frame in frames]
    counts = {len(part["choices"].iloc[0]) for part in parts}
    if len(counts) > 1:
        raise DataFileError(f"{subset_folder}: the shards' questions have different numbers of choices {sorted(counts)}")
    return with_item_ids(pd.concat(parts, ignore_index=True).drop(columns="item_id"), f"wmdp-{subset}")


def _load_dataset(*args: Any, **kwargs: Any):
    # Imported here: ``datasets`` is slow to import and only the hub path needs it.
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


def _read_question_hub(subset: str, token: str | None) -> pd.DataFrame:
    origin = f"{WMDP_HUB_ID} ({hub_config(subset)}, {WMDP_SPLIT})"
    try:
        dataset = _load_dataset(WMDP_HUB_ID, hub_config(subset), split=WMDP_SPLIT, token=token)
    except Exception as exc:  # network, missing cache offline, auth: one clear message
        raise DataFileError(
            f"could not read {origin} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "set the source to a local JSON Lines file or a folder in the hub's Parquet layout"
        ) from exc
    frame = dataset.to_pandas()
    missing = [name for name in QUESTION_FIELDS if name not in frame.columns]
    if missing:
        raise DataFileError(f"{origin}: lacks field(s) {missing}; expected {list(QUESTION_FIELDS)}")
    return parse_wmdp_questions(_frame_rows(frame), subset, origin)


def load_wmdp_questions(subset: str, source: str | Path | None = None, token: str | None = None) -> pd.DataFrame:
    """The questions of ``subset`` from the hub (``source`` None), a JSON Lines file or a Parquet folder."""
    check_subset(subset)
    if source is None:
        return _read_question_hub(subset, token)
    path = Path(source)
    if path.is_dir():
        return _read_question_parquet(path, subset)
    if not path.is_file():
        raise DataFileError(f"missing file {path.name!r} in folder {str(path.parent)!r} (WMDP {subset} questions)")
    return parse_wmdp_questions(_json_lines(path), subset, str(path))


# ---------------------------------------------------------------- corpora


def _bio_forget_gated_message(subset: str) -> str:
    return (
        f"the WMDP {subset} forget corpus is not on the public hub ({WMDP_CORPORA_HUB_ID} publishes "
        f"bio-retain, cyber-forget and cyber-retain only): its authors share it on request through the form "
        f"{WMDP_BIO_FORGET_FORM} (the hub copy {WMDP_BIO_FORGET_HUB_ID} is gated: access on request). Once you have "
        f"it, put bio-forget-corpus.jsonl (one {{\"text\": ...}} per line) and bio-retain-corpus.jsonl in a "
        "folder and pass that folder as the corpora source; for evaluation only, load with need_corpora=False"
    )


def parse_corpus_lines(rows: Iterable[tuple[str, Any]], origin: str) -> list[str]:
    """Documents from ``(where, value)`` pairs: ``{"text": str}`` objects or bare strings."""
    texts: list[str] = []
    for where, value in rows:
        if isinstance(value, dict):
            if "text" not in value:
                raise DataFileError(f"{origin}: {where} lacks field 'text'; expected {{\"text\": ...}} or a JSON string")
            value = value["text"]
            if not isinstance(value, str):
                raise DataFileError(f"{origin}: {where} field 'text' must be a string, got {type(value).__name__}")
        elif not isinstance(value, str):
            raise DataFileError(
                f"{origin}: {where} is a JSON {type(value).__name__}; expected {{\"text\": ...}} or a JSON string"
            )
        texts.append(value)
    if not texts:
        raise DataFileError(f"{origin}: the file holds no documents")
    return texts


def _read_corpus_hub(subset: str, role: str, token: str | None) -> list[str]:
    if (subset, role) not in HUB_CORPORA:
        if subset == "bio":
            raise DataFileError(_bio_forget_gated_message(subset))
        raise DataFileError(
            f"WMDP publishes no {subset} corpora (only bio and cyber); pass need_corpora=False to evaluate "
            f"WMDP-{subset} only, or a corpora folder with {corpus_name(subset, 'forget')}.jsonl and "
            f"{corpus_name(subset, 'retain')}.jsonl"
        )
    origin = f"{WMDP_CORPORA_HUB_ID} ({corpus_name(subset, role)}, {WMDP_CORPORA_SPLIT})"
    try:
        dataset = _load_dataset(WMDP_CORPORA_HUB_ID, corpus_name(subset, role), split=WMDP_CORPORA_SPLIT, token=token)
    except Exception as exc:  # network, missing cache offline: one clear message
        raise DataFileError(
            f"could not read {origin} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local corpora folder instead"
        ) from exc
    if "text" not in dataset.column_names:
        raise DataFileError(f"{origin}: lacks field 'text'; has {dataset.column_names}")
    return parse_corpus_lines(((f"row {index}", {"text": text}) for index, text in enumerate(dataset["text"])), origin)


def load_wmdp_corpus(
    subset: str, role: str, corpora_source: str | Path | None = None, token: str | None = None
) -> list[str]:
    """The ``role`` (forget/retain) corpus of ``subset``: the hub when ``corpora_source`` is None,
    else ``<corpora_source>/<subset>-<role>-corpus.jsonl``."""
    name = corpus_name(subset, role)
    if corpora_source is None:
        return _read_corpus_hub(subset, role, token)
    folder = Path(corpora_source)
    if not folder.is_dir():
        raise DataFileError(f"WMDP corpora folder {str(folder)!r} does not exist")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        hint = f" ({_bio_forget_gated_message(subset)})" if (subset, role) == ("bio", "forget") else ""
        raise DataFileError(f"missing file {path.name!r} in WMDP corpora folder {str(folder)!r}{hint}")
    return parse_corpus_lines(_json_lines(path), str(path))


def load_wmdp(
    subset: str,
    source: str | Path | None = None,
    corpora_source: str | Path | None = None,
    token: str | None = None,
    need_corpora: bool = True,
) -> WMDPBenchmark:
    """Load WMDP-``subset``: questions from ``source``, corpora from ``corpora_source``.

    ``source`` None reads ``cais/wmdp`` from the hub; else a JSON Lines file or a folder in the hub's
    Parquet layout. ``corpora_source`` None reads ``cais/wmdp-corpora`` (the bio forget corpus is not
    public: a clear error says how to get it); else a folder of ``<subset>-<role>-corpus.jsonl``.
    With ``need_corpora=False`` (evaluation only) the hub is never asked for corpora, and a local
    folder's files are read when present and left empty when absent.
    """
    check_subset(subset)
    questions = load_wmdp_questions(subset, source, token)
    corpora: dict[str, list[str]] = {role: [] for role in CORPUS_ROLES}
    if need_corpora:
        # Forget first: the unpublished corpora (bio forget, chem) fail before anything is downloaded.
        for role in CORPUS_ROLES:
            corpora[role] = load_wmdp_corpus(subset, role, corpora_source, token)
    elif corpora_source is not None:
        folder = Path(corpora_source)
        if not folder.is_dir():
            raise DataFileError(f"WMDP corpora folder {str(folder)!r} does not exist")
        for role in CORPUS_ROLES:
            if (folder / f"{corpus_name(subset, role)}.jsonl").is_file():
                corpora[role] = load_wmdp_corpus(subset, role, folder, token)
    return WMDPBenchmark(subset=subset, questions=questions, forget_corpus=corpora["forget"], retain_corpus=corpora["retain"])
