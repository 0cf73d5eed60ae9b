"""TOFU's "I don't know" answers: the shared file, the folder form, the hub path (faked), errors, assignment."""

from __future__ import annotations

import random

import huggingface_hub
import pytest

from conftest import TOFU_DIR, require_dir
from simu_core.data import DataFileError
from simu_core.data.idk import IDK_FILE_NAME, IDK_HUB_FILE, IDK_HUB_REPO, assign_idk_answers, load_idk_answers


def _shared_file():
    path = require_dir(TOFU_DIR) / IDK_FILE_NAME
    if not path.is_file():
        pytest.skip(f"shared file {path} is not present")
    return path


def test_shared_file_holds_tofus_100_answers():
    answers = load_idk_answers(str(_shared_file()))
    assert len(answers) == 100
    assert answers[0] == "I'm not certain about that."
    assert answers[-1] == "I'm not sure I can help with that."
    assert all(answer and answer == answer.strip() for answer in answers)


def test_folder_form_reads_idontknow_jsonl():
    path = _shared_file()
    assert load_idk_answers(str(path.parent)) == load_idk_answers(path)


def test_blank_lines_and_surrounding_spaces_are_dropped(tmp_path):
    path = tmp_path / "answers.txt"
    path.write_text("  I don't know. \n\nNo idea.\r\n   \n", encoding="utf-8")
    assert load_idk_answers(str(path)) == ["I don't know.", "No idea."]


def test_missing_file_names_the_path_and_the_field(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataFileError, match="unlearn.idk_source") as error:
        load_idk_answers(str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(DataFileError, match=IDK_FILE_NAME) as error:
        load_idk_answers(str(tmp_path))  # a folder without the file
    assert str(tmp_path) in str(error.value) and "unlearn.idk_source" in str(error.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / IDK_FILE_NAME
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataFileError, match="no answers"):
        load_idk_answers(str(tmp_path))


@pytest.mark.parametrize("source", [None, "open-unlearning/idk", "locuslab/TOFU"])
def test_hub_sources_download_open_unlearnings_copy(tmp_path, monkeypatch, source):
    downloaded = tmp_path / IDK_HUB_FILE
    downloaded.write_text("I don't know.\nNo idea.\n", encoding="utf-8")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_idk_answers(source) == ["I don't know.", "No idea."]
    assert calls == [{"repo_id": IDK_HUB_REPO, "filename": IDK_HUB_FILE, "repo_type": "dataset"}]


def test_failed_download_is_a_clear_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataFileError, match="open-unlearning/idk.*no network.*unlearn.idk_source"):
        load_idk_answers(None)


def test_assignment_is_seeded_reproducible_and_seed_dependent():
    answers = [f"answer {index}" for index in range(100)]
    first = assign_idk_answers(40, answers, seed=0)
    random.seed(123)  # the global RNG plays no part
    assert assign_idk_answers(40, answers, seed=0) == first
    assert assign_idk_answers(40, answers, seed=1) != first
    assert len(first) == 40 and set(first) <= set(answers)
    assert len(set(first)) > 10  # drawn, not one answer repeated
    assert assign_idk_answers(0, answers, seed=0) == []
    with pytest.raises(ValueError, match="at least one answer"):
        assign_idk_answers(3, [], seed=0)
    with pytest.raises(ValueError, match="n_items"):
        assign_idk_answers(-1, answers, seed=0)
