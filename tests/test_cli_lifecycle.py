"""The ``simu`` process from the outside: a clean first run, SIGTERM, no orphan Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import PROJECT_ROOT

# The smallest run that goes through every stage (about 5 s of work; the rest is Prefect's start).
TINY_RUN = [
    "unlearn.stop_at=null",  # a fixed budget (the default config stops at the reference's level)
    "data.num_authors=10", "data.holdout_authors=1", "data.general_facts=4",
    "model.tiny.num_layers=1", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=400", "model.max_length=64", "model.finetune.epochs=1",
    "attribution.max_items=4", "attribution.batch_size=4", "unlearn.max_steps=1", "unlearn.batch_size=4",
    "eval.max_items=4", "eval.max_new_tokens=4", "eval.batch_size=8",
]


def _sets(overrides):
    return [item for override in overrides for item in ("--set", override)]


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    """A fresh PREFECT_HOME shared by this module's CLI runs (the first one sees it empty)."""
    return tmp_path_factory.mktemp("prefect-home")


def _cli_env(prefect_home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "OMP_NUM_THREADS": "1"}
    # As on a user's machine: the CLI itself must turn the server's telemetry off.
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
    env.pop("PREFECT_API_URL", None)
    return env


def test_first_run_output_has_no_traceback(prefect_home, tmp_path):
    assert not any(prefect_home.iterdir()), "this test needs a fresh PREFECT_HOME"
    paths = [f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *_sets(TINY_RUN + paths)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=_cli_env(prefect_home), timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "results:" in result.stdout
    assert "Traceback" not in output, output
    assert "| ERROR" not in output, output  # e.g. the server's telemetry heartbeat


class _Output:
    """Collects a subprocess's merged output in a thread; waits for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in line for line in self.lines):
                return True
            time.sleep(0.1)
        return False

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "".join(self.lines)


def test_sigterm_records_interrupted_run_and_leaves_no_process(prefect_home, tmp_path):
    # Fine-tuning long enough (tens of seconds) to be killed in the middle of train_target.
    overrides = [o for o in TINY_RUN if not o.startswith("model.finetune.epochs")] + [
        "model.finetune.epochs=400", f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *_sets(overrides)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT, env=_cli_env(prefect_home),
    )
    output = _Output(process)
    try:
        assert output.wait_for("Task run 'prepare_data'", timeout=120), output.text()
        time.sleep(1.0)  # inside train_target
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert any("flows.server_guard" in " ".join(child.cmdline()) for child in descendants), \
            "the temporary server is not started under flows.server_guard"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
        exit_seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    text = output.text()
    assert returncode == 128 + signal.SIGTERM, text
    assert exit_seconds < 30, exit_seconds
    print(f"exit {exit_seconds:.1f} s after SIGTERM")
    _, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, [(child.pid, child.cmdline()) for child in alive]
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert runs["status"].tolist() == ["interrupted"], runs[["status", "error"]]
    assert runs["state.train_target"].iloc[0] == "Interrupted"
    assert "train_target" in runs.columns.str.removeprefix("seconds.").tolist()


def test_server_guard_stops_its_child_when_the_parent_is_killed(tmp_path):
    # A parent that starts a guarded child (any module: here a blocking http.server) and then
    # is SIGKILLed: the child must not outlive it.
    parent_script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'flows.server_guard', str(os.getpid()),\n"
        "                          'http.server', '--bind', '127.0.0.1', '0'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE, text=True,
                              cwd=PROJECT_ROOT)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        time.sleep(1.0)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait(timeout=10)
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the guarded child outlived its SIGKILLed parent"
    finally:
        if child.is_running():
            child.kill()
