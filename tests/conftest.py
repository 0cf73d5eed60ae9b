"""Shared fixtures: a small trained target / retain reference, Prefect isolation, data paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Isolate Prefect before anything imports it: no telemetry, a throwaway home per test session.
_PREFECT_HOME = tempfile.mkdtemp(prefix="simu-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models are dominated by per-op overhead: one intra-op thread is as fast and never
# oversubscribes the 2 cores when tests run flows in threads (sweeps, Dask).
torch.set_num_threads(1)

from simu_core.config import load_config  # noqa: E402
from simu_core.paths import PROJECT_ROOT, SHARED_DATA_DIR  # noqa: E402

TOFU_DIR = SHARED_DATA_DIR / "tofu"
LUME_DIR = SHARED_DATA_DIR / "lume"

# A smaller configuration of the built-in benchmark that still memorises (seconds to train).
SMALL_OVERRIDES = [
    "unlearn.stop_at=null",  # a fixed budget (the default config stops at the reference's level)
    "data.num_authors=20",
    "data.holdout_authors=2",
    "data.general_facts=12",
    "model.tiny.num_layers=2",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=256",
    "model.tiny.vocab_size=512",
    "model.max_length=96",
    "model.finetune.epochs=30",
    "model.finetune.lr=5e-3",
]


@pytest.fixture(scope="session")
def small_config():
    """The small built-in configuration (20 authors, 2-layer model)."""
    return load_config(overrides=SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def trained_small(tmp_path_factory, small_config):
    """Prepared data plus trained target and retain reference of the small configuration.

    Returns a dict of folders: ``data``, ``target``, ``reference``; and the stats of training.
    """
    from simu_core.stages import prepare_data, train_model

    root = tmp_path_factory.mktemp("trained_small")
    folders = {name: root / name for name in ("data", "target", "reference")}
    sizes = prepare_data(small_config, folders["data"])
    stats = {
        which: train_model(small_config, folders["data"], folders[which], which, progress=False)
        for which in ("target", "reference")
    }
    return {**folders, "sizes": sizes, "stats": stats, "config": small_config}


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server on SQLite) shared by the pipeline tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def require_dir(path: Path) -> Path:
    """Skip the test cleanly when a shared data folder is absent."""
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is not present")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored after (a test elsewhere may change it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_script(name: str):
    """A script of ``scripts/`` imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
