"""Sequential deletion requests (data.requests): selectors, bad input, the select_request stage,
the chained flow (a 4th request computes only its own stages) and the report's section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simu_core.config import ConfigError, load_config
from simu_core.requests import RequestError, expand_requests, restrict_forget
from test_pipeline import PIPELINE_OVERRIDES


def test_a_number_of_requests_cuts_the_forget_split_in_contiguous_batches():
    # forget10 of the built-in benchmark: 4 authors x 10 items, so 2 or 4 requests fall on author boundaries.
    four = expand_requests(4, 40)
    assert four == [[f"forget-{row}" for row in range(start, start + 10)] for start in (0, 10, 20, 30)]
    # numpy.array_split's sizes: the first len % N batches one item longer.
    three = expand_requests(3, 10)
    assert [len(batch) for batch in three] == [len(part) for part in np.array_split(range(10), 3)] == [4, 3, 3]
    assert sum(three, []) == [f"forget-{row}" for row in range(10)]


def test_selectors_expand_to_item_ids_in_the_given_order():
    requests = [["forget-5", "forget-0:2"], ["forget-2:4"]]
    assert expand_requests(requests, 10) == [["forget-5", "forget-0", "forget-1"], ["forget-2", "forget-3"]]
    assert load_config(overrides=["data.requests=[[forget-0:2], [forget-2:4]]"]).data.requests == [
        ["forget-0:2"], ["forget-2:4"]]


@pytest.mark.parametrize("value, message", [
    ("[[forget-0:4], [forget-2:6]]", "data.requests: Value error, requests 1 and 2 overlap (selector 'forget-2:6'): "
                                     "forget-2, forget-3"),
    ("[[forget-0:10], [forget-1, forget-0:8]]", "requests 1 and 2 overlap (selector 'forget-1'): forget-1"),
    ("[[forget-0:3, forget-2]]", "request 1 names these items twice (selector 'forget-2'): forget-2"),
    ("[[forget-0:2], [retain-3]]", "request 2, selector 'retain-3': expected an item id 'forget-<row>' or a range"),
    ("[[forget-0:2], [forget-4:2]]", "request 2, selector 'forget-4:2': empty range"),
    ("[[forget-0:2], [3]]", "request 2, selector 3: expected an item id"),
    ("[[forget-0:2], []]", "request 2 is []: expected a non-empty list"),
    ("[]", "data.requests: Value error, empty list"),
    ("1", "data.requests: Value error, 1 is too few: sequential deletion needs at least 2 requests"),
    ("forget-0:2", "expected a number of requests (>= 2) or a list of requests"),
])
def test_bad_requests_are_refused_when_the_config_loads(value, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[f"data.requests={value}"])
    assert message in str(error.value)


def test_the_union_so_far_takes_the_requests_in_turn_so_an_evaluation_cut_covers_them_all(tmp_path):
    from simu_core.evaluation.qa import evaluation_splits
    from simu_core.requests import union_order
    from simu_core.stages import prepare_data, read_benchmark, select_request

    requests = expand_requests([["forget-0:3"], ["forget-3"], ["forget-4:6"]], 10)
    assert union_order(requests) == ["forget-0", "forget-3", "forget-4", "forget-1", "forget-5", "forget-2"]
    assert union_order(requests[:1]) == requests[0]
    # The evaluation keeps the first eval.max_items forget items of the union: one of each request here.
    prepare_data(load_config(overrides=PIPELINE_OVERRIDES), tmp_path / "data")
    select_request(tmp_path / "data", tmp_path / "union", union_order(requests))
    evaluated = evaluation_splits(read_benchmark(tmp_path / "union"), max_items=3)["forget"]["item_id"].tolist()
    assert [[item for item in request if item in evaluated] for request in requests] == [
        ["forget-0"], ["forget-3"], ["forget-4"]]


def test_fewer_evaluated_items_than_requests_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"eval.max_items=2 with 3 deletion requests \(data.requests\): .*every "
                                          r"request"):
        load_config(overrides=["data.requests=3", "eval.max_items=2"])
    with pytest.raises(ConfigError, match=r"eval.max_items=1 with 2 deletion requests"):
        load_config(overrides=["data.requests=[[forget-0:2], [forget-2:4]]", "eval.max_items=1"])
    assert load_config(overrides=["data.requests=3", "eval.max_items=3"]).eval.max_items == 3


def test_a_one_item_request_with_the_knockout_check_is_refused_before_anything_runs():
    from simu_core.preflight import PreflightError, check_inputs

    # The knockout chooses its neurons on half of a request's forget items and measures the other half.
    one_item = ["data.requests=[[forget-0:3], [forget-3]]"]
    with pytest.raises(PreflightError, match=r"request 2 has 1 forget item: the knockout check .* at least 2 .*"
                                             r"knockout.enabled=false"):
        check_inputs(load_config(overrides=one_item))
    check_inputs(load_config(overrides=[*one_item, "knockout.enabled=false"]))
    check_inputs(load_config(overrides=[*one_item, "unlearn.method=so_graddiff"]))  # no mask, no knockout


def test_overlap_names_the_first_few_shared_items():
    with pytest.raises(ConfigError, match=r"forget-2, forget-3, forget-4, forget-5, forget-6, \.\.\. \(8 in all\)"):
        load_config(overrides=["data.requests=[[forget-0:10], [forget-2:10]]"])


def test_lume_and_the_relearning_attack_are_refused():
    with pytest.raises(ConfigError, match="sequential deletion requests are for the TOFU-style benchmarks"):
        load_config(overrides=["data.benchmark=lume", "model.target=org/model", "data.requests=2"])
    with pytest.raises(ConfigError, match=r"data.requests with attacks=\['relearn'\]: the attacks run after a single"):
        load_config(overrides=["data.requests=2", "relearn.enabled=true"])


def test_items_outside_the_benchmark_and_too_many_requests():
    with pytest.raises(RequestError, match=r"request 2 names items not in the benchmark \(its forget split has 10 "
                                           r"items, forget-0 to forget-9\): forget-10, forget-12"):
        expand_requests([["forget-0:2"], ["forget-9", "forget-10", "forget-12"]], 10)
    with pytest.raises(RequestError, match="data.requests=11: more requests than the 10 forget items"):
        expand_requests(11, 10)
    # A mistyped range is named, never materialised.
    with pytest.raises(RequestError, match=r"forget-400, forget-401, .*, \.\.\. \(9999999600 in all\)"):
        expand_requests([["forget-0:10000000000"]], 400)


def test_restrict_forget_and_the_select_request_stage(tmp_path):
    from simu_core.data import generate_synthetic
    from simu_core.stages import BENCHMARK_DIR, read_benchmark, select_request

    benchmark = generate_synthetic(num_authors=10, holdout_authors=1, general_facts=4)
    chosen = restrict_forget(benchmark, ["forget-7", "forget-2"])
    assert chosen["forget"]["item_id"].tolist() == ["forget-7", "forget-2"]
    assert chosen["forget"].iloc[0].to_dict() == benchmark["forget"].iloc[7].to_dict()
    for split in benchmark:
        if split != "forget":
            pd.testing.assert_frame_equal(chosen[split], benchmark[split])
    with pytest.raises(RequestError, match="items not in the forget split .*: forget-99"):
        restrict_forget(benchmark, ["forget-1", "forget-99"])

    benchmark.save(tmp_path / "data" / BENCHMARK_DIR)
    (tmp_path / "data" / "tokenizer").mkdir()
    (tmp_path / "data" / "tokenizer" / "tokenizer.json").write_text("{}")
    sizes = select_request(tmp_path / "data", tmp_path / "out", ["forget-3", "forget-4"])
    assert sizes["forget"] == 2 and sizes["retain"] == len(benchmark["retain"])
    assert read_benchmark(tmp_path / "out")["forget"]["item_id"].tolist() == ["forget-3", "forget-4"]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists() and (tmp_path / "out" / "sizes.json").exists()


# ------------------------------------------------------------------------------------------------
# The flow (PIPELINE_OVERRIDES: 10 forget items); SIMU without the knockout check, so that each
# request re-attributes on the model the one before produced.

THREE = [["forget-0:2"], ["forget-2:4"], ["forget-4:6"]]
FOUR = [*THREE, ["forget-6:8"]]


@pytest.fixture(scope="module")
def requests_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}", "knockout.enabled=false"], root


def run_requests(paths, requests):
    from flows.pipeline import simu_pipeline

    listed = "[" + ", ".join("[" + ", ".join(request) + "]" for request in requests) + "]"
    return simu_pipeline(overrides=PIPELINE_OVERRIDES + paths + [f"data.requests={listed}"])


def test_items_not_in_the_benchmark_stop_the_flow_before_any_training(prefect_api, requests_workspace):
    paths, root = requests_workspace
    with pytest.raises(ConfigError, match=r"request 2 names items not in the benchmark .*: forget-10, forget-11"):
        run_requests(paths, [["forget-0:2"], ["forget-9:12"]])
    assert (root / "store" / "prepare_data").is_dir() and not (root / "store" / "train_target").exists()
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    assert runs["status"].tolist() == ["failed"] and "forget-10" in runs["error"].iloc[0]


def test_a_fourth_request_computes_only_its_own_stages(prefect_api, requests_workspace):
    from tasks.caching import open_store

    paths, root = requests_workspace
    first = run_requests(paths, THREE)
    assert {state for label, state in first["states"].items() if label != "prepare_data"} == {"Completed"}
    assert [point["items"] for point in first["requests"]] == [2, 4, 6]
    assert "request1.select_seen" not in first["states"]  # request 1's union is its own data
    for label in ("request2.select", "request2.select_seen", "request2.attribute_forget", "request2.attribute_retain",
                  "request2.threshold_mask", "request2.unlearn", "request2.evaluate_reference", "request2.evaluate"):
        assert label in first["states"], label

    second = run_requests(paths, FOUR)
    requests4 = {label for label in second["states"] if label.startswith("request4.")}
    assert len(requests4) == 8, requests4
    for label, state in second["states"].items():
        assert state == ("Completed" if label in requests4 else "Cached"), (label, state)

    # Each request unlearned from the model the request before produced (request 1: the target).
    store = open_store(str(root / "store"))
    points = second["requests"]
    assert points[0]["start"]["stage"] == "train_target"
    for before, after in zip(points, points[1:]):
        assert after["start"] == before["model"]
        assert f"target={before['model']['key']}" in store.manifest(after["model"])["input_keys"]
    assert [point["model"] for point in points[:3]] == [point["model"] for point in first["requests"]]

    # One runs-table row per request, with its tables under request<i>/.
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    latest = runs[runs["run_id"] == second["run_id"]]
    assert latest["kind"].tolist() == ["request"] * 4
    assert latest["request.index"].tolist() == [1, 2, 3, 4] and set(latest["request.count"]) == {4}
    assert latest["request.items"].tolist() == [2, 4, 6, 8] and latest["forget_quality"].notna().all()
    for index in range(1, 5):
        folder = Path(second["run_dir"]) / f"request{index}"
        metrics = pd.read_parquet(folder / "metrics.parquet")
        assert set(metrics["model"]) == {"unlearned", "reference"}
        assert (folder / "mask.parquet").exists() and (folder / "train_log.parquet").exists()
        items = pd.read_parquet(folder / "items.parquet")
        forget = items[(items["split"] == "forget") & (items["model"] == "unlearned")]
        assert len(forget) == min(2 * index, 6)  # eval.max_items=6 of the union so far
        # ... taken from every request so far in turn (request 4: 8 items, 6 evaluated).
        evaluated = set(forget["item_id"])
        for request in FOUR[:index]:
            start, end = map(int, request[0].removeprefix("forget-").split(":"))
            assert evaluated & {f"forget-{row}" for row in range(start, end)}, (index, request, evaluated)


def test_cli_summary_and_report_show_the_curve(prefect_api, requests_workspace):
    import contextlib
    import io

    from flows.cli import print_run_summary
    from flows.report import write_report

    paths, root = requests_workspace
    summary = run_requests(paths, FOUR)  # every stage cached
    with contextlib.redirect_stdout(io.StringIO()) as buffer:
        print_run_summary(summary)
    printed = buffer.getvalue().splitlines()
    header = printed.index(next(line for line in printed if line.startswith("request ")))
    assert printed[header].split() == ["request", "items", "so", "far", "forget_quality", "model_utility",
                                       "forget_prob"]
    assert [line.split()[:2] for line in printed[header + 2:header + 6]] == [["1", "2"], ["2", "4"], ["3", "6"],
                                                                             ["4", "8"]]
    assert any(line.startswith("metric") and "after the last request" in line for line in printed)

    written = write_report(root / "results")  # sequential runs only
    assert "## Sequential deletion requests" in written["markdown"]
    assert Path(written["plots"]["requests"]).stat().st_size > 0
    table = pd.read_csv(root / "results" / "report" / "requests.csv")
    # The 3- and the 4-request runs are two settings (data.requests differs): 3 + 4 rows.
    assert sorted(table["items so far"]) == [2, 2, 4, 4, 6, 6, 8] and set(table["seeds"]) == {1}
    assert {"model_utility_mean", "forget_quality_mean", "forget_prob_mean"} <= set(table.columns)
    # Each request's own items after every later request (request_items.parquet per request folder).
    assert "Forget probability of each request's own items" in written["markdown"]
    followed = pd.read_csv(root / "results" / "report" / "request_items.csv")
    last = followed[followed["after request"] == 4]
    assert {f"request {index} items" for index in range(1, 5)} <= set(followed.columns) and len(last) == 1
    assert last[[f"request {index} items" for index in range(1, 5)]].notna().all(axis=None)
