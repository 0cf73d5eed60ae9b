"""The built-in synthetic benchmark: a deterministic, TOFU-shaped set of fictitious authors.

Each author gets attribute values drawn from ``data/synthetic/vocabulary.yaml`` and one QA pair per
template of ``templates.yaml``: an answer, a paraphrased question (the paraphrase attack's prompt; drawn
from no random state, so adding it changed no other value), a paraphrased answer (another template, same value) and
5 perturbed answers (the paraphrase template filled with wrong values of the same vocabulary, so
they are plausible). Held-out authors are never trained on (MIA non-members). A general-facts set
(``general_facts.yaml``) plays the role of TOFU's real-authors and world-facts utility sets.
Forget splits take the LAST 1% / 5% / 10% of authors, as TOFU does.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simu_core.data.schema import QABenchmark, with_item_ids
from simu_core.paths import SYNTHETIC_DATA_DIR

FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
NUM_PERTURBED = 5
NUM_WRONG_OPTIONS = 3


@lru_cache(maxsize=4)
def _load_yaml(folder: str, name: str) -> Any:
    return yaml.safe_load((Path(folder) / name).read_text())


def _attribute_values(vocabulary: dict[str, list], attribute: str) -> list[str]:
    if attribute == "title":
        return [f"{adj} {noun}" for adj in vocabulary["title_adjective"] for noun in vocabulary["title_noun"]]
    return [str(value) for value in vocabulary[attribute]]


def _author_rows(
    name: str, templates: list[dict], vocabulary: dict[str, list], qa_per_author: int, rng: random.Random
) -> list[dict[str, Any]]:
    rows = []
    for template in templates[:qa_per_author]:
        pool = _attribute_values(vocabulary, template["attribute"])
        value = rng.choice(pool)
        wrong = rng.sample([candidate for candidate in pool if candidate != value], NUM_PERTURBED)
        rows.append(
            {
                "author": name,
                "question": template["question"].format(name=name),
                "paraphrased_question": template["paraphrased_question"].format(name=name),
                "answer": template["answer"].format(name=name, value=value),
                "paraphrased_answer": template["paraphrase"].format(name=name, value=value),
                "perturbed_answer": [template["paraphrase"].format(name=name, value=w) for w in wrong],
            }
        )
    return rows


def _general_facts(section: dict, count: int, rng: random.Random, field: str) -> pd.DataFrame:
    pairs = list(section["pairs"].items())
    if count > len(pairs):
        raise ValueError(f"data.general_facts={count} exceeds the {len(pairs)} {field} facts shipped in data/")
    answers = sorted({answer for _, answer in pairs})
    rows = []
    for key, answer in pairs[:count]:
        wrong = rng.sample([candidate for candidate in answers if candidate != answer], NUM_WRONG_OPTIONS)
        rows.append({"question": section["question"].format(key=key), "answer": answer, "perturbed_answer": wrong})
    return pd.DataFrame(rows)


def generate_synthetic(
    split: str = "forget10",
    num_authors: int = 40,
    holdout_authors: int = 4,
    qa_per_author: int = 10,
    general_facts: int = 40,
    retain_authors: int | None = None,
    seed: int = 0,
    folder: str | Path = SYNTHETIC_DATA_DIR,
) -> QABenchmark:
    """Generate the synthetic benchmark deterministically from ``seed``."""
    if split not in FORGET_FRACTIONS:
        raise ValueError(f"unknown forget split {split!r}; expected one of {sorted(FORGET_FRACTIONS)}")
    vocabulary = _load_yaml(str(folder), "vocabulary.yaml")
    templates = _load_yaml(str(folder), "templates.yaml")
    facts = _load_yaml(str(folder), "general_facts.yaml")
    if not 1 <= qa_per_author <= len(templates):
        raise ValueError(f"data.qa_per_author must be in [1, {len(templates)}] (templates shipped), got {qa_per_author}")
    rng = random.Random(seed)
    all_names = [f"{first} {last}" for first in vocabulary["first_names"] for last in vocabulary["last_names"]]
    total = num_authors + holdout_authors
    if total > len(all_names):
        raise ValueError(f"data.num_authors + data.holdout_authors = {total} exceeds the {len(all_names)} names available")
    names = rng.sample(all_names, total)
    authors = [_author_rows(name, templates, vocabulary, qa_per_author, rng) for name in names]

    num_forget = max(1, round(FORGET_FRACTIONS[split] * num_authors))
    retain_pool = authors[: num_authors - num_forget]
    if retain_authors is not None:
        retain_pool = retain_pool[:retain_authors]
    forget_items = pd.DataFrame([row for author in authors[num_authors - num_forget : num_authors] for row in author])
    retain_items = pd.DataFrame([row for author in retain_pool for row in author])
    holdout_items = pd.DataFrame([row for author in authors[num_authors:] for row in author])
    real_authors = _general_facts(facts["real_authors"], general_facts, rng, "real_authors")
    world_facts = _general_facts(facts["world_facts"], general_facts, rng, "world_facts")

    qa = ["question", "answer"]
    perturbed = ["question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"]
    general = pd.concat([real_authors[qa], world_facts[qa]])
    splits = {
        "train_target": with_item_ids(pd.concat([retain_items[qa], forget_items[qa], general]), "train"),
        "train_reference": with_item_ids(pd.concat([retain_items[qa], general]), "train"),
        "forget": with_item_ids(forget_items[perturbed], "forget"),
        "retain": with_item_ids(retain_items[qa], "retain"),
        "retain_eval": with_item_ids(retain_items[perturbed], "retain"),
        "holdout": with_item_ids(holdout_items[qa], "holdout"),
        "real_authors": with_item_ids(real_authors, "real_authors"),
        "world_facts": with_item_ids(world_facts, "world_facts"),
    }
    return QABenchmark(name="synthetic", forget_split=split, splits=splits)
