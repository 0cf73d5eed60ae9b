"""scripts/preferred_answers.py: a DPO preferred-answer file from the benchmark's own perturbed answers,
one per forget question, which the dpo loss then reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simu_core.config import load_config
from simu_core.data import load_benchmark
from simu_core.paths import PROJECT_ROOT
from simu_core.preferred import preferred_pairs
from tests.conftest import load_script

SMALL = ["data.num_authors=10", "data.holdout_authors=1", "data.general_facts=4"]


def test_one_perturbed_answer_per_forget_question_which_dpo_reads(tmp_path):
    out = tmp_path / "preferred.jsonl"
    args = [sys.executable, str(PROJECT_ROOT / "scripts" / "preferred_answers.py"), "--choice", "1", "--out", str(out)]
    for override in SMALL:
        args += ["--set", override]
    subprocess.run(args, check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    forget = load_benchmark(load_config(overrides=SMALL).data)["forget"]
    assert [row["question"] for row in rows] == list(forget["question"])
    assert [row["answer"] for row in rows] == [list(options)[1] for options in forget["perturbed_answer"]]
    kept, answers = preferred_pairs("dpo", forget, seed=0, preferred_source=str(out))
    assert answers == [row["answer"] for row in rows] and len(kept) == len(forget)


def test_a_choice_beyond_the_perturbed_answers_is_refused():
    with pytest.raises(ValueError, match=r"--choice 9: the question .* has 5 perturbed answers"):
        load_script("preferred_answers").preferred_rows(None, SMALL, 9)
