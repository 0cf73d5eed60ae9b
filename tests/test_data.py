"""Data layer: TOFU and LUME loaders on the shared files, the synthetic generator."""

from __future__ import annotations

import json

import pytest

from conftest import LUME_DIR, TOFU_DIR, require_dir
from simu_core.data import DataFileError, generate_synthetic, load_lume, load_tofu, load_tofu_config, read_jsonl
from simu_core.data.tofu import TOFU_CONFIGS


@pytest.mark.parametrize("name", sorted(TOFU_CONFIGS))
def test_every_tofu_config_rows_and_fields(name):
    folder = require_dir(TOFU_DIR)
    expected_rows, fields = TOFU_CONFIGS[name]
    frame = load_tofu_config(name, folder)
    assert len(frame) == expected_rows
    assert set(fields) <= set(frame.columns)
    if "perturbed_answer" in fields:
        lengths = frame["perturbed_answer"].map(len).unique().tolist()
        assert lengths == ([3] if name.startswith(("real", "world")) else [5])


@pytest.mark.parametrize("split, forget, retain, holdout", [("forget01", 40, 3960, 40), ("forget05", 200, 3800, 200), ("forget10", 400, 3600, 400)])
def test_tofu_pairing(split, forget, retain, holdout):
    benchmark = load_tofu(split, require_dir(TOFU_DIR))
    sizes = benchmark.sizes()
    assert (sizes["forget"], sizes["retain"], sizes["holdout"]) == (forget, retain, holdout)
    assert sizes["train_target"] == 4000 and sizes["retain_eval"] == 400
    # The forget authors are the last ones of full; none of their questions is in retain.
    assert not set(benchmark["forget"]["question"]) & set(benchmark["retain"]["question"])


def test_tofu_retain_author_subset():
    benchmark = load_tofu("forget01", require_dir(TOFU_DIR), retain_authors=5)
    assert benchmark.sizes()["retain"] == 100 and benchmark.sizes()["train_target"] == 140


def test_tofu_bad_input(tmp_path):
    with pytest.raises(ValueError, match="forget07"):
        load_tofu("forget07", tmp_path)
    with pytest.raises(DataFileError, match="retain99.json"):
        load_tofu("forget01", tmp_path)
    with pytest.raises(DataFileError, match="does not exist"):
        load_tofu_config("full", tmp_path / "nowhere")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{not json\n")
    with pytest.raises(DataFileError, match=r"full.json: line 2"):
        read_jsonl(path, ("question", "answer"))
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataFileError, match=r"line 1 lacks field\(s\) \['answer'\]"):
        read_jsonl(path, ("question", "answer"))


def test_lume_rows_parsed():
    lume = load_lume(require_dir(LUME_DIR))
    assert lume.sizes() == {"forget": 2732, "retain": 2734, "mia_member": 150, "mia_nonmember": 150}
    forget = lume.split("forget")
    counts = forget.groupby(["task", "kind"]).size().to_dict()
    assert counts[("Task2", "qa")] == 1250 and counts[("Task1", "completion")] == 243
    assert set(lume.rows["kind"]) == {"completion", "qa"}
    assert set(lume.rows["task"]) == {"Task1", "Task2", "Task3"}


def test_lume_parquet_layout_and_errors(tmp_path):
    lume = load_lume(require_dir(LUME_DIR))
    (tmp_path / "data").mkdir()
    for split in ("forget", "retain"):
        lume.split(split)[["id", "input", "output", "task"]].head(10).to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    for name in ("mia_member", "mia_nonmember"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "1", "document": "text"}) + "\n")
    loaded = load_lume(tmp_path)
    assert loaded.sizes()["forget"] == 10
    (tmp_path / "forget.jsonl").write_text(json.dumps({"id": "xsc1", "input": "i", "task": "Task1"}) + "\n")
    with pytest.raises(DataFileError, match="forget.jsonl: line 1 lacks field"):
        load_lume(tmp_path)
    (tmp_path / "forget.jsonl").unlink()
    (tmp_path / "mia_member.jsonl").unlink()
    with pytest.raises(DataFileError, match="mia_member.jsonl"):
        load_lume(tmp_path)
    with pytest.raises(DataFileError, match="forget.jsonl"):
        load_lume(LUME_DIR.parent / "tofu")


def test_synthetic_is_deterministic_and_tofu_shaped():
    first = generate_synthetic(num_authors=20, holdout_authors=2, general_facts=10, seed=3)
    second = generate_synthetic(num_authors=20, holdout_authors=2, general_facts=10, seed=3)
    other = generate_synthetic(num_authors=20, holdout_authors=2, general_facts=10, seed=4)
    for split in first:
        assert first[split].equals(second[split])
    assert not first["forget"].equals(other["forget"])
    sizes = first.sizes()
    assert sizes["forget"] == 2 * 10 and sizes["retain"] == 18 * 10 and sizes["holdout"] == 20
    assert sizes["train_target"] == 200 + 20 and sizes["train_reference"] == 180 + 20


def test_synthetic_perturbations_fill_the_same_slot():
    benchmark = generate_synthetic(num_authors=10, holdout_authors=1, general_facts=5)
    for row in benchmark["forget"].itertuples():
        assert len(row.perturbed_answer) == 5 and len(set(row.perturbed_answer)) == 5
        assert row.paraphrased_answer not in row.perturbed_answer
        # same template: the perturbed answers share the paraphrase's prefix up to the slot
        prefix = row.paraphrased_answer.split()[:3]
        assert all(answer.split()[:3] == prefix for answer in row.perturbed_answer)
    for row in benchmark["real_authors"].itertuples():
        assert len(row.perturbed_answer) == 3 and row.answer not in row.perturbed_answer


def test_synthetic_forget_fractions_and_limits():
    assert generate_synthetic("forget01", num_authors=100, holdout_authors=1, general_facts=4).sizes()["forget"] == 10
    assert generate_synthetic("forget05", num_authors=40, holdout_authors=1, general_facts=4).sizes()["forget"] == 20
    with pytest.raises(ValueError, match="data.general_facts"):
        generate_synthetic(general_facts=500)
    with pytest.raises(ValueError, match="forget splits|forget split"):
        generate_synthetic("forget33")
