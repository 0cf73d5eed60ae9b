"""The preferred answer of each forget item, for the preference losses (DPO, IdkDPO, AltPO).

All three minimise DPO's loss with the forget answer as the rejected response; they differ in where
the preferred response comes from:

| loss      | preferred answer                                                             | read from |
|-----------|------------------------------------------------------------------------------|-----------|
| ``dpo``   | the user's own, one per forget question                                      | ``unlearn.preferred_source`` (JSON Lines ``{"question", "answer"}``) |
| ``idk_dpo``| an "I don't know" answer, one per item drawn with ``run.seed``              | ``unlearn.idk_source``, else ``data.source``'s folder, else the hub |
| ``altpo`` | each of the target's own alternates (``unlearn.altpo_alternates`` per item: every one is a training pair, as AltPO trains) | the ``generate_alternates`` stage |

A stage's key holds what these files contain, not their names (:func:`preferred_identity`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from simu_core.data.idk import IDK_FILE_NAME, IDK_HUB_REPO, IDK_HUB_SOURCES, assign_idk_answers, load_idk_answers
from simu_core.data.jsonl import DataFileError, read_jsonl
from simu_core.method_names import PREFERENCE_LOSSES

PREFERRED_SOURCE_FIELD = "unlearn.preferred_source"

__all__ = ["PREFERENCE_LOSSES", "idk_source", "preferred_identity", "preferred_pairs"]


def idk_source(configured: str | None, data_source: str | None) -> str | None:
    """Where the "I don't know" answers come from: ``unlearn.idk_source``; else ``data.source``'s folder
    when it holds TOFU's file; else None (open-unlearning's copy on the hub)."""
    if configured is not None:
        return configured
    if data_source and (Path(data_source) / IDK_FILE_NAME).is_file():
        return data_source
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def preferred_identity(loss: str, configured_idk: str | None, preferred_source: str | None,
                       data_source: str | None) -> dict[str, Any] | None:
    """What the preferred answers are read from, by content (the unlearn key's entry); None for the
    losses that read no file. Raises DataFileError naming the field for a missing file."""
    if loss == "dpo":
        if preferred_source is None:
            raise DataFileError(f"the dpo loss needs {PREFERRED_SOURCE_FIELD}: a JSON Lines file of preferred answers "
                                "{'question', 'answer'} (or use idk_dpo, or altpo for the model's own alternates)")
        path = Path(preferred_source)
        if not path.is_file():
            raise DataFileError(f"{PREFERRED_SOURCE_FIELD}={preferred_source!r} does not exist")
        return {"preferred_sha256": _sha256(path)}
    if loss == "idk_dpo":
        source = idk_source(configured_idk, data_source)
        if source in IDK_HUB_SOURCES:
            return {"idk": f"hub:{IDK_HUB_REPO}"}
        path = Path(source)
        path = path / IDK_FILE_NAME if path.is_dir() else path
        if not path.is_file():
            load_idk_answers(source)  # raises the loader's error, naming the field
        return {"idk_sha256": _sha256(path)}
    return None


def _preferred_by_question(path: str, forget: pd.DataFrame) -> list[str]:
    rows = read_jsonl(path, ("question", "answer"))
    answers = {str(row["question"]): str(row["answer"]) for row in rows}
    missing = [question for question in forget["question"] if question not in answers]
    if missing:
        raise DataFileError(f"{PREFERRED_SOURCE_FIELD}={path!r} has no answer for {len(missing)} of the "
                            f"{len(forget)} forget questions, e.g. {missing[0]!r}")
    return [answers[question] for question in forget["question"]]


def preferred_pairs(loss: str, forget: pd.DataFrame, *, seed: int, configured_idk: str | None = None,
                    preferred_source: str | None = None, data_source: str | None = None,
                    alternates: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The forget rows to train on and each one's preferred answer (same order). AltPO repeats each
    forget row once per alternate; the other losses keep the forget rows as they are."""
    if loss == "idk_dpo":
        answers = load_idk_answers(idk_source(configured_idk, data_source))
        return forget, assign_idk_answers(len(forget), answers, seed)
    if loss == "dpo":
        if preferred_source is None:
            raise DataFileError(f"the dpo loss needs {PREFERRED_SOURCE_FIELD}")
        return forget, _preferred_by_question(preferred_source, forget)
    if loss == "altpo":
        if alternates is None:
            raise ValueError("the altpo loss needs the generate_alternates stage's alternates")
        by_item = alternates.groupby("item_id", sort=False)
        missing = sorted(set(forget["item_id"]) - set(by_item.groups))
        if missing:
            raise ValueError(f"no alternates for {len(missing)} forget items, e.g. {missing[0]!r}")
        rows, preferred = [], []
        for _, row in forget.iterrows():
            for alternate in by_item.get_group(row["item_id"]).sort_values("sample")["alternate"]:
                rows.append(row)
                preferred.append(str(alternate))
        return pd.DataFrame(rows).reset_index(drop=True), preferred
    raise ValueError(f"loss {loss!r} has no preferred answers; preference losses: {list(PREFERENCE_LOSSES)}")
