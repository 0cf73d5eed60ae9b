"""MMLU accuracy from a local MMLU-format dataset (the utility term of the LUME final score).

Accepted folder layouts (test split only; dev/validation/auxiliary_train files are ignored):

1. Hugging Face ``cais/mmlu`` (Parquet): ``<folder>/<subject>/test-*.parquet`` with columns
   ``question``, ``choices`` (list of option texts), ``answer`` (index 0..3, or a letter), and
   ``subject`` (else the folder name is the subject). When ``<folder>/all/test-*.parquet`` exists it
   is used alone, since the per-subject folders repeat the same rows.
2. The original Hendrycks release (CSV, no header): ``<folder>/[test/]<subject>_test.csv`` with
   columns question, A, B, C, D, answer letter.

Scoring follows the lm-evaluation-harness ``mmlu`` task (zero-shot): the prompt
``The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}\\n
A. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``; the prediction is the letter continuation (`` A`` ..)
with the highest log-likelihood. Accuracy is the mean over all questions (micro average).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.evaluation.scoring import score_examples
from simu_core.prompting import IGNORE_INDEX, EncodedExample, pad_token_id

MMLU_COLUMNS = ("subject", "question", "choices", "answer")
_EXCLUDED_FOLDERS = {"all", "auxiliary_train"}


class MMLUFormatError(ValueError):
    """The MMLU folder is missing or not in a supported layout; the message names the file."""


def _answer_index(value, choices: list[str], origin: str, row: int) -> int:
    if isinstance(value, str):
        letter = value.strip().upper()
        index = string.ascii_uppercase.find(letter) if len(letter) == 1 else -1
    else:
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
    if not 0 <= index < len(choices):
        raise MMLUFormatError(f"{origin}: row {row} has answer {value!r}, not an index/letter of its {len(choices)} choices")
    return index


def _normalise(frame: pd.DataFrame, origin: str, subject: str) -> pd.DataFrame:
    missing = [column for column in ("question", "choices", "answer") if column not in frame.columns]
    if missing:
        raise MMLUFormatError(f"{origin}: lacks column(s) {missing}; expected question, choices, answer")
    rows = []
    for row, record in enumerate(frame.to_dict("records")):
        choices = [str(choice) for choice in list(record["choices"])]
        if len(choices) < 2:
            raise MMLUFormatError(f"{origin}: row {row} has {len(choices)} choices; at least 2 are needed")
        if not isinstance(record["question"], str):
            raise MMLUFormatError(f"{origin}: row {row} question is not a string")
        rows.append(
            {
                "subject": str(record.get("subject") or subject),
                "question": record["question"],
                "choices": choices,
                "answer": _answer_index(record["answer"], choices, origin, row),
            }
        )
    return pd.DataFrame(rows, columns=list(MMLU_COLUMNS))


def _read_csv(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if frame.shape[1] < 4:
        raise MMLUFormatError(f"{path}: expected columns question, options..., answer letter; got {frame.shape[1]} columns")
    return pd.DataFrame(
        {
            "question": frame.iloc[:, 0],
            "choices": frame.iloc[:, 1:-1].values.tolist(),
            "answer": frame.iloc[:, -1],
        }
    )


def load_mmlu(source: str | Path, max_items_per_subject: int | None = None) -> pd.DataFrame:
    """Read a local MMLU folder into ``subject, question, choices, answer`` (answer: option index)."""
    folder = Path(source)
    if not folder.is_dir():
        raise MMLUFormatError(f"MMLU folder {str(folder)!r} does not exist")
    frames: list[pd.DataFrame] = []
    combined = sorted((folder / "all").glob("test-*.parquet")) if (folder / "all").is_dir() else []
    parquet = combined or sorted(
        path for path in folder.rglob("test-*.parquet") if not _EXCLUDED_FOLDERS & set(path.relative_to(folder).parts)
    )
    if parquet:
        for path in parquet:
            frames.append(_normalise(pd.read_parquet(path), str(path), subject=path.parent.name))
    else:
        for path in sorted(folder.rglob("*_test.csv")):
            frames.append(_normalise(_read_csv(path), str(path), subject=path.name[: -len("_test.csv")]))
    if not frames:
        raise MMLUFormatError(
            f"no MMLU test files in {str(folder)!r}: expected <subject>/test-*.parquet (cais/mmlu) "
            "or [test/]<subject>_test.csv (Hendrycks CSV)"
        )
    data = pd.concat(frames, ignore_index=True)
    if data.empty:
        raise MMLUFormatError(f"the MMLU test files in {str(folder)!r} hold no rows")
    if max_items_per_subject:
        data = data.groupby("subject", sort=False).head(max_items_per_subject).reset_index(drop=True)
    return data


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """The lm-evaluation-harness zero-shot MMLU prompt."""
    lines = [f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.", ""]
    lines.append(question.strip())
    lines.extend(f"{letter}. {choice}" for letter, choice in zip(string.ascii_uppercase, choices))
    return "\n".join(lines) + "\nAnswer:"


def evaluate_mmlu(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: pd.DataFrame,
    batch_size: int = 16,
    max_length: int = 512,
) -> pd.DataFrame:
    """Per-question predictions: ``subject, question, answer, prediction, correct``."""
    missing = [column for column in MMLU_COLUMNS if column not in data.columns]
    if missing:
        raise MMLUFormatError(f"MMLU data lacks column(s) {missing}")
    if data.empty:
        raise MMLUFormatError("MMLU data holds no questions")
    examples, owners = [], []
    for number, record in enumerate(data.itertuples(index=False)):
        prompt = tokenizer(mmlu_prompt(record.subject, record.question, list(record.choices)), add_special_tokens=True)["input_ids"]
        for option in range(len(record.choices)):
            continuation = tokenizer(" " + string.ascii_uppercase[option], add_special_tokens=False)["input_ids"]
            # Keep the end of an over-long prompt: the options and "Answer:" decide the prediction.
            kept = prompt[-(max_length - len(continuation)) :]
            examples.append(
                EncodedExample(input_ids=kept + continuation, labels=[IGNORE_INDEX] * len(kept) + continuation)
            )
            owners.append(number)
    # The options of a question share its prompt: one prompt pass, four one-token continuations.
    scored = score_examples(model, examples, pad_token_id(tokenizer), batch_size, share_prompts=True)
    loglik = scored.sum_logprob
    predictions = np.empty(len(data), dtype=np.int64)
    position = 0
    for number, record in enumerate(data.itertuples(index=False)):
        count = len(record.choices)
        predictions[number] = int(np.argmax(loglik[position : position + count]))
        position += count
    out = data[["subject", "question", "answer"]].reset_index(drop=True).copy()
    out["prediction"] = predictions
    out["correct"] = (out["prediction"] == out["answer"]).astype(float)
    return out
