"""Caching glue between Prefect and the content-addressed store.

A stage task's cache key is ``INPUTS + TASK_SOURCE``: its parameters, code version and input
references (the full config is excluded because each stage declares the parameters it reads).
Before calling a task, the flow checks the stage's store entry; when it is missing or corrupt the
task is called with ``refresh_cache=True``, so Prefect never serves a reference whose files are
gone or altered. Inside the task, :func:`run_stage` computes the entry at most once per host
(file lock), or reuses one another run committed meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from filelock import FileLock
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from simu_core.store import ArtifactStore, CorruptArtifactError, stage_key

_STORES: dict[str, ArtifactStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(url: str) -> ArtifactStore:
    """One ArtifactStore per URL and process (memory:// stores must be shared)."""
    with _STORES_LOCK:
        if url not in _STORES:
            _STORES[url] = ArtifactStore(url)
        return _STORES[url]


def input_keys(inputs: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """The store keys of a stage's inputs, in a fixed (sorted-by-name) order."""
    return [f"{name}={ref['key']}" if ref else f"{name}=-" for name, ref in sorted(inputs.items())]


def key_for(stage: str, code_version: str, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """The content key of a stage's output."""
    return stage_key(stage, code_version, params, input_keys(inputs))


def entry_is_valid(store_url: str, stage: str, code_version: str, params: Mapping[str, Any],
                   inputs: Mapping[str, Any]) -> bool:
    """True when the stage's store entry exists and every file verifies against its manifest."""
    try:
        return open_store(store_url).get(stage, key_for(stage, code_version, params, inputs)) is not None
    except CorruptArtifactError:
        return False


def stage_cache_policy(stage: str) -> CachePolicy:
    """INPUTS (minus the full config, whose relevant part is ``params``) + TASK_SOURCE.

    The flow calls a task with ``refresh_cache=True`` whenever its store entry is missing or fails
    verification (:func:`entry_is_valid`), so a cached reference to absent or altered files is
    never served: the task runs and recomputes the entry.
    """
    return (INPUTS - "config") + TASK_SOURCE


def _lock_dir(store_url: str) -> Path:
    if "://" not in store_url or store_url.startswith("file://"):
        folder = Path(store_url.removeprefix("file://")) / ".locks"
    else:
        digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / "simu-locks" / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def stage_lock(store_url: str, stage: str, key: str) -> Iterator[None]:
    """Serialise computation of one store entry across threads and processes on this host."""
    with FileLock(str(_lock_dir(store_url) / f"{stage}-{key[:32]}.lock")):
        yield


EXTERNAL = "external"


def external_model_ref(model_id: str, fingerprint: Mapping[str, Any]) -> dict[str, str]:
    """A reference to a model the user brings (hub id or path) instead of a trained artifact.

    Its key is its content (``fingerprint``: a folder's files or a hub commit, see
    ``simu_core.models.identity``), so a retrained folder or a new hub revision is a new input to
    every stage after it, while the same files under another path are not.
    """
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return {"stage": EXTERNAL, "key": digest, "uri": model_id, "manifest_sha256": digest}


def _input_dir(store: ArtifactStore, ref: Mapping[str, Any] | None) -> Path | None:
    if ref is None:
        return None
    if ref["stage"] == EXTERNAL:
        return Path(ref["uri"])
    # No re-hash here: the flow verified this entry (entry_is_valid) when it called the stage that
    # produced it, or that stage just wrote it; hashing a 7B model again per consumer costs minutes.
    return store.local_dir(ref)


def run_stage(
    stage: str,
    store_url: str,
    code_version: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Mapping[str, Any] | None],
    compute: Callable[[Path, dict[str, Path | None]], dict[str, Any]],
) -> dict[str, Any]:
    """Return the stage's store reference, computing it (once) when absent or corrupt.

    ``compute(out_dir, input_dirs)`` writes the stage's files into ``out_dir`` and returns a small
    summary, stored as the entry's metadata.
    """
    store = open_store(store_url)
    key = key_for(stage, code_version, params, inputs)
    with stage_lock(store_url, stage, key):
        try:
            ref = store.get(stage, key)
        except CorruptArtifactError:
            # Never use an altered artifact: drop it and recompute.
            store.invalidate(stage, key)
            ref = None
        if ref is None:
            input_dirs = {name: _input_dir(store, value) for name, value in inputs.items()}
            started = time.perf_counter()
            with store.writer(stage, key, code_version=code_version, params=dict(params), input_keys=input_keys(inputs)) as writer:
                summary = compute(writer.dir, input_dirs)
                writer.metadata.update({"summary": summary, "compute_seconds": time.perf_counter() - started})
            ref = writer.ref
    return ref.to_dict()
