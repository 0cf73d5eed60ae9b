"""Hand-computed checks of the LUME (SemEval-2025 Task 4) metric functions."""

from __future__ import annotations

import numpy as np
import pytest

from simu_core.metrics import lume
from simu_core.metrics.lume import TASK_AGGREGATE_CELLS
from simu_core.metrics.rouge import rouge_l_recall


def test_row_kind():
    assert lume.row_kind('"8f24c511-a319-4a9f-80c2-ca6fac131233"sc1') == "regurgitation"
    assert lume.row_kind("36307590qa0") == "knowledge"
    assert lume.row_kind("36307590qa4") == "knowledge"
    with pytest.raises(ValueError, match="36307590"):
        lume.row_kind("36307590")


def test_knowledge_score_exact_match_after_strip_lower():
    assert lume.knowledge_score("  Paris\n", "paris") == 1.0
    assert lume.knowledge_score("Paris, France", "Paris") == 0.0
    assert lume.knowledge_score("", "Paris") == 0.0


def test_regurgitation_score_is_rouge_l_recall():
    # LCS("the cat sat on the mat", "the cat on a mat") = 4 of the 6 gold tokens
    assert lume.regurgitation_score("the cat on a mat", "the cat sat on the mat") == pytest.approx(4 / 6, rel=1e-15)


def _cells(forget: float, retain: float) -> dict[tuple[str, str, str], float]:
    return {c: (forget if c[0] == "forget" else retain) for c in TASK_AGGREGATE_CELLS}


def test_task_aggregate_cells():
    assert len(TASK_AGGREGATE_CELLS) == 12
    assert ("forget", "Task2", "knowledge") in TASK_AGGREGATE_CELLS


def test_task_aggregate_hand_value():
    # forget cells 0.2 -> 1 - 0.2 = 0.8 (x6), retain cells 0.4 (x6):
    # 12 / (6/0.8 + 6/0.4) = 12 / (7.5 + 15) = 0.5333...
    assert lume.task_aggregate(_cells(0.2, 0.4)) == pytest.approx(12 / 22.5, rel=1e-15)


def test_task_aggregate_mixed_hand_value():
    cells = _cells(0.0, 1.0)  # all terms 1
    cells[("retain", "Task3", "knowledge")] = 0.5  # one term 0.5
    cells[("forget", "Task1", "regurgitation")] = 0.75  # one term 1 - 0.75 = 0.25
    # 12 / (10*1 + 1/0.5 + 1/0.25) = 12 / 16 = 0.75
    assert lume.task_aggregate(cells) == pytest.approx(0.75, rel=1e-15)


def test_task_aggregate_zero_term_gives_zero():
    cells = _cells(0.2, 0.4)
    cells[("retain", "Task2", "regurgitation")] = 0.0
    assert lume.task_aggregate(cells) == 0
    cells = _cells(0.2, 0.4)
    cells[("forget", "Task1", "knowledge")] = 1.0  # forget term 1 - 1 = 0
    assert lume.task_aggregate(cells) == 0


def test_task_aggregate_missing_or_extra_cell_is_named():
    cells = _cells(0.2, 0.4)
    del cells[("forget", "Task3", "knowledge")]
    with pytest.raises(ValueError, match=r"'forget', 'Task3', 'knowledge'"):
        lume.task_aggregate(cells)
    cells = _cells(0.2, 0.4)
    cells[("holdout", "Task1", "knowledge")] = 0.5
    with pytest.raises(ValueError, match="holdout"):
        lume.task_aggregate(cells)


def test_task_aggregate_rejects_out_of_range_and_nan():
    cells = _cells(0.2, 0.4)
    cells[("retain", "Task1", "knowledge")] = 1.5
    with pytest.raises(ValueError, match="Task1"):
        lume.task_aggregate(cells)
    cells[("retain", "Task1", "knowledge")] = float("nan")
    with pytest.raises(ValueError, match="Task1"):
        lume.task_aggregate(cells)


def test_mia_score_hand_values():
    # members all lower NLL than non-members: AUC 1 -> 1 - 2*0.5 = 0
    assert lume.mia_score([1.0, 2.0], [3.0, 4.0]) == 0.0
    # members [1, 3] vs non-members [2, 4]: AUC 3/4 -> 1 - 2*0.25 = 0.5
    assert lume.mia_score([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.5, rel=1e-15)
    # members all higher NLL: AUC 0 -> score 0 as well
    assert lume.mia_score([3.0, 4.0], [1.0, 2.0]) == 0.0
    # identical: AUC 0.5 -> 1
    assert lume.mia_score([2.0, 2.0], [2.0]) == 1.0


def test_mia_auc_matches_official_convention():
    # Official scorer: score = -NLL, label member = 1, trapezoidal ROC AUC (= pair count with ties 1/2).
    rng = np.random.default_rng(1)
    member = np.round(rng.normal(1.8, 0.4, 150), 2)
    nonmember = np.round(rng.normal(2.0, 0.4, 150), 2)
    s_m, s_n = -member, -nonmember
    diff = s_m[:, None] - s_n[None, :]  # member scored higher = correctly ranked positive
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert lume.mia_auc(member, nonmember) == pytest.approx(expected, rel=1e-14)
    assert lume.mia_score(member, nonmember) == pytest.approx(1 - 2 * abs(expected - 0.5), rel=1e-14)


def test_final_score():
    # (0.3 + 0.6 + 0.9) / 3 = 0.6
    assert lume.final_score(0.3, 0.6, 0.9) == pytest.approx(0.6, rel=1e-15)
    assert lume.final_score(0.3, 0.6, None) is None


def test_final_score_validation():
    with pytest.raises(ValueError, match="mmlu"):
        lume.final_score(0.3, 0.6, float("nan"))
    with pytest.raises(ValueError, match="task_aggregate"):
        lume.final_score(-0.1, 0.6, 0.5)


def test_mia_score_validation():
    with pytest.raises(ValueError, match="member_nll is empty"):
        lume.mia_score([], [1.0])
    with pytest.raises(ValueError, match=r"nonmember_nll .* index 0"):
        lume.mia_score([1.0], [float("inf")])


# ---------------------------------------------------------------- the official scorer's CSV round trip


def _official_round_trip(generations: list[str], golds: list[str]) -> list[tuple[str, str]]:
    """What the official scorer scores: its frame written to CSV and read back with pandas, then str()."""
    import io

    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame({"expected_output": golds, "model_output": generations}).to_csv(buffer, index=False)
    frame = pd.read_csv(io.StringIO(buffer.getvalue()))
    return [(str(gt), str(gen)) for gt, gen in zip(frame["expected_output"], frame["model_output"])]


def test_generations_read_as_missing_are_scored_as_the_official_scorer_reads_them():
    missing = sorted(lume.CSV_MISSING_VALUES)
    generations = [*missing, " N/A", "N/A.", "Paris", "none", "nan bread"]
    golds = ["the n a nan bread"] * len(generations)
    read_back = _official_round_trip(generations, golds)
    # The constant is exactly the set pandas reads as missing (all and only those became "nan").
    assert [gen == "nan" for _, gen in read_back] == [text in lume.CSV_MISSING_VALUES for text in generations]
    for generation, (gold, official) in zip(generations, read_back):
        assert lume.as_scored_by_official_scorer(generation) == official
        assert lume.regurgitation_score(generation, gold) == rouge_l_recall(official, gold)
        assert lume.knowledge_score(generation, gold) == float(official.strip().lower() == gold.strip().lower())
    # Hand values: "N/A" is scored as "nan" (1 of the 5 gold tokens), not as the tokens "n a" (3 of 5).
    assert lume.regurgitation_score("N/A", "the n a nan bread") == pytest.approx(1 / 5, rel=1e-15)
    assert lume.regurgitation_score("", "nan bread") == pytest.approx(1 / 2, rel=1e-15)
    assert lume.knowledge_score("NA", "None") == 1.0  # both read back as nan
    assert lume.knowledge_score("None", "Paris") == 0.0


def test_mmlu_threshold_is_the_official_one():
    assert lume.MMLU_THRESHOLD == 0.371
    assert lume.mmlu_below_threshold(0.37) and not lume.mmlu_below_threshold(0.371)
    with pytest.raises(ValueError, match="mmlu"):
        lume.mmlu_below_threshold(float("nan"))
