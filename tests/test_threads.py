"""CPU threads: sweep points running at once share the cores; the CLI picks a load-aware budget.

Issue 11, defect 7: ``simu ablate`` ran points in threads of one process, each with every core as
torch threads, so two points on 2 cores fought over them (torch processes sharing 2 cores ran
10-60x slower than their share). ``benchmarks/threads.py`` measures the options and the sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import PROJECT_ROOT
from simu_core.threads import available_cores, busy_cores, configure_threads, threads_for


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "parallel, cores, busy, expected",
    [
        (1, 2, 0.0, 2), (2, 2, 0.0, 1), (4, 2, 0.0, 1),  # points share the cores, at least 1 each
        (1, 2, 0.4, 2), (1, 2, 0.6, 1), (1, 2, 2.0, 1), (1, 2, 5.0, 1),  # a core is taken from half its time
        (2, 8, 3.0, 2), (3, 16, 0.0, 5), (1, 8, -1.0, 8),
    ],
)
def test_threads_for_shares_the_free_cores(parallel, cores, busy, expected):
    assert threads_for(parallel, cores=cores, busy=busy) == expected


def test_thread_settings_reject_bad_values_and_measure_the_load():
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        threads_for(0, cores=2, busy=0)
    with pytest.raises(ValueError, match="cores must be >= 1"):
        threads_for(1, cores=0, busy=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        configure_threads(0)
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 0.5
    assert 1 <= threads_for(1) <= available_cores()


def test_configure_threads_in_a_process_that_loaded_torch(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("simu_core.threads.busy_cores", lambda interval=0.25: 0.0)
    torch.set_num_threads(1)
    assert configure_threads(None) == 1 == torch.get_num_threads()  # never above the host's setting
    assert configure_threads(3) == 3 == torch.get_num_threads()  # asked for: given
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads(None) == 2


def test_configure_threads_before_torch_sets_the_environment_it_reads():
    env = {key: value for key, value in os.environ.items() if not key.startswith("OMP_")}
    code = (
        "import os; from simu_core.threads import configure_threads; n = configure_threads(1); "
        "import torch; print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["1", "1", "PASSIVE"]  # torch alone would take every core


def test_cli_rejects_a_bad_thread_count(capsys):
    from flows.cli import build_parser, main

    assert build_parser().parse_args(["ablate", "--grid", "mask.threshold=0.1,0.2", "--threads", "2"]).threads == 2
    with pytest.raises(SystemExit) as stop:
        main(["ablate", "--grid", "mask.threshold=0.1,0.2", "--threads", "0"])
    assert stop.value.code == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_sweep_points_in_parallel_share_the_threads(prefect_api, tmp_path, monkeypatch, restore_threads):
    import flows.ablation as ablation

    seen: list[tuple[float, int, int]] = []

    def fake_pipeline(overrides, config_path):  # records what each point ran with
        lr = next(item for item in overrides if item.startswith("unlearn.lr="))
        seen.append((float(lr.split("=")[1]), threading.get_ident(), torch.get_num_threads()))
        return {"run_id": lr, "metrics": {}, "states": {}, "run_dir": str(tmp_path)}

    monkeypatch.setattr(ablation, "simu_pipeline", fake_pipeline)
    monkeypatch.setattr(ablation, "simu_report", lambda results: {"report": "none"})
    torch.set_num_threads(4)  # this process's budget (the CLI sets it from the free cores)
    grid = {"unlearn.lr": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]}
    overrides = [f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"]
    ablation.simu_ablation(grid=grid, overrides=overrides, max_parallel=2)
    threads = {lr: count for lr, _, count in seen}
    assert threads == {1e-4: 4, 2e-4: 2, 3e-4: 2, 4e-4: 2, 5e-4: 2}  # the first alone, then 2 x 2
    assert len({ident for _, ident, _ in seen[1:]}) == 2  # two worker threads
    assert torch.get_num_threads() == 4  # the caller's setting is left as it was
    seen.clear()
    ablation.simu_ablation(grid=grid, overrides=overrides, max_parallel=2, threads=1, first_threads=3)
    assert {lr: count for lr, _, count in seen} == {1e-4: 3, 2e-4: 1, 3e-4: 1, 4e-4: 1, 5e-4: 1}
    # One thread to give: points run one after another (in parallel they would only contend).
    seen.clear()
    torch.set_num_threads(1)
    ablation.simu_ablation(grid=grid, overrides=overrides, max_parallel=2)
    assert {count for _, _, count in seen} == {1} and len({ident for _, ident, _ in seen[1:]}) == 1
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ablation.simu_ablation(grid=grid, overrides=overrides, threads=0)
