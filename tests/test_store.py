"""Tests of the content-addressed artifact store (simu_core.store)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from simu_core.store import (
    MANIFEST_NAME,
    ArtifactRef,
    ArtifactStore,
    CorruptArtifactError,
    InvalidStoreURLError,
    StaleReferenceError,
    stage_key,
)

CV = "v1"
PARAMS = {"lr": 1e-5, "steps": 3, "nested": {"b": [1, 2], "a": "x"}}
INPUTS = ["a" * 64]


def _key(stage: str = "unlearn", cv: str = CV, params=PARAMS, inputs=INPUTS) -> str:
    return stage_key(stage, cv, params, inputs)


def _put(store: ArtifactStore, files=None, stage: str = "unlearn", params=PARAMS, **kw):
    files = files if files is not None else {"a.txt": b"hello", "sub/b.bin": b"\x00\x01\x02"}
    return store.put(
        stage, None, files, code_version=CV, params=params, input_keys=INPUTS, **kw
    )


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
        return
    url = f"memory://simu-test-{uuid.uuid4().hex}"
    s = ArtifactStore(url, cache_dir=tmp_path / "cache")
    yield s
    if s.fs.exists(s.root):
        s.fs.rm(s.root, recursive=True)


def _entry_path(store: ArtifactStore, stage: str, key: str) -> str:
    return f"{store.root}/{stage}/{key}"


def _stage_children(store: ArtifactStore, stage: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(f"{store.root}/{stage}", detail=False)]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------- keys


def test_key_is_deterministic_hex_and_independent_of_dict_order():
    k = _key()
    assert k == _key() and len(k) == 64 and int(k, 16) >= 0
    reordered = {"nested": {"a": "x", "b": [1, 2]}, "steps": 3, "lr": 1e-5}
    assert _key(params=reordered) == k


def test_key_is_stable_across_processes():
    # PYTHONHASHSEED differs per process: the key must not depend on it.
    code = (
        "from simu_core.store import stage_key;"
        f"print(stage_key('unlearn', {CV!r}, {PARAMS!r}, {INPUTS!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == _key()


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "evaluate"},
        {"cv": "v2"},
        {"params": {**PARAMS, "lr": 2e-5}},
        {"params": {**PARAMS, "nested": {"b": [2, 1], "a": "x"}}},
        {"params": {**PARAMS, "extra": None}},
        {"inputs": ["b" * 64]},
        {"inputs": INPUTS + ["c" * 64]},
        {"inputs": []},
    ],
)
def test_key_changes_with_each_component(change):
    assert _key(**change) != _key()


def test_key_input_order_matters_and_paths_become_str():
    assert _key(inputs=["x", "y"]) != _key(inputs=["y", "x"])
    assert _key(params={"p": Path("/data/tofu")}) == _key(params={"p": "/data/tofu"})
    assert _key(params={"t": (1, 2)}) == _key(params={"t": [1, 2]})


def test_key_rejects_bad_params_naming_the_key():
    with pytest.raises(TypeError, match=r"params\.outer\.tags.*sorted list"):
        _key(params={"outer": {"tags": {"a", "b"}}})
    with pytest.raises(TypeError, match=r"params\.model.*object"):
        _key(params={"model": object()})
    with pytest.raises(TypeError, match="non-str key"):
        _key(params={1: "x"})
    with pytest.raises(ValueError, match=r"params\.lr.*NaN"):
        _key(params={"lr": float("nan")})
    with pytest.raises(TypeError, match="input_keys"):
        _key(inputs="abc")
    with pytest.raises(TypeError, match="input_keys"):
        _key(inputs={"abc"})


@pytest.mark.parametrize("bad", ["a/b", "a\\b", "..", ".hidden", "", "x" * 200])
def test_invalid_stage_names_rejected(bad, tmp_path):
    with pytest.raises(ValueError, match="invalid stage name"):
        stage_key(bad, CV, {}, [])
    st = ArtifactStore(str(tmp_path))
    with pytest.raises(ValueError, match="invalid stage name"):
        st.get(bad, "a" * 64)


def test_invalid_urls(tmp_path):
    with pytest.raises(InvalidStoreURLError, match="empty"):
        ArtifactStore("")
    with pytest.raises(InvalidStoreURLError, match="nosuchproto"):
        ArtifactStore("nosuchproto://bucket/x")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InvalidStoreURLError, match="not a folder"):
        ArtifactStore(str(f))


# ------------------------------------------------------------------------- round trip


def test_put_get_round_trip(store):
    ref = _put(store, metadata={"wall_s": 1.5})
    assert ref.key == _key()
    assert store.exists("unlearn", ref.key)
    got = store.get("unlearn", ref.key)
    assert got == ref
    assert store.read_bytes(ref, "a.txt") == b"hello"
    assert store.read_bytes(ref.to_dict(), "sub/b.bin") == b"\x00\x01\x02"
    m = store.manifest(ref)
    assert m["stage"] == "unlearn" and m["key"] == ref.key and m["code_version"] == CV
    assert m["params"] == PARAMS and m["input_keys"] == INPUTS
    assert m["metadata"] == {"wall_s": 1.5} and "created_at" in m
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert m["files"]["a.txt"]["size"] == 5 and len(m["files"]["a.txt"]["sha256"]) == 64
    assert store.keys("unlearn") == [ref.key]
    # nothing temporary is left behind
    assert _stage_children(store, "unlearn") == [ref.key]


def test_ref_is_json_and_round_trips(store):
    ref = _put(store)
    d = ref.to_dict()
    assert set(d) == {"stage", "key", "uri", "manifest_sha256"}
    assert ArtifactRef.from_dict(json.loads(json.dumps(d))) == ref
    assert ref.uri.endswith(f"/unlearn/{ref.key}")
    with pytest.raises(ValueError, match="missing"):
        ArtifactRef.from_dict({"stage": "x"})


def test_get_absent_returns_none(store):
    assert store.get("unlearn", _key()) is None
    assert not store.exists("unlearn", _key())


def test_writer_with_local_paths_and_parquet(store):
    df = pd.DataFrame({"layer": [0, 1], "neuron": [3, 4], "score": [0.5, 0.25]})
    with store.writer("attribute", code_version=CV, params={"m": 4}, input_keys=INPUTS) as w:
        w.write_parquet("scores.parquet", df)
        p = w.path("model/config.json")  # e.g. save_pretrained writes into a local folder
        assert p.parent.is_dir()
        p.write_text('{"a": 1}')
        w.metadata["n"] = 2
    ref = w.ref
    assert ref is not None and ref.key == stage_key("attribute", CV, {"m": 4}, INPUTS)
    pd.testing.assert_frame_equal(store.read_parquet(ref, "scores.parquet"), df)
    assert store.read_json(ref, "model/config.json") == {"a": 1}
    assert store.manifest(ref)["metadata"] == {"n": 2}


def test_put_with_callback_and_key_mismatch(store):
    ref = store.put(
        "report", None, lambda w: w.write_text("r.txt", "ok"), code_version=CV, params={}
    )
    assert store.read_bytes(ref, "r.txt") == b"ok"
    with pytest.raises(ValueError, match="does not match"):
        store.put("report", "f" * 64, {"x": b""}, code_version=CV, params={})


def test_bad_file_names_rejected(store):
    for bad in ["../x", "/abs", MANIFEST_NAME, "a//b", "a\\b"]:
        with pytest.raises(ValueError):
            _put(store, files={bad: b"x"})
    assert not store.exists("unlearn", _key())


# ------------------------------------------------------------- atomicity / failures


def test_failure_inside_writer_commits_nothing(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("unlearn", code_version=CV, params=PARAMS, input_keys=INPUTS) as w:
            w.write_bytes("weights.safetensors", b"partial")
            tmp_dir = w.dir
            raise RuntimeError("boom")
    key = _key()
    assert store.get("unlearn", key) is None
    assert not store.exists("unlearn", key)
    assert not store.fs.exists(_entry_path(store, "unlearn", key))
    assert not store.fs.exists(f"{_entry_path(store, 'unlearn', key)}/{MANIFEST_NAME}")
    assert not tmp_dir.exists()
    assert [c for c in _stage_children(store, "unlearn") if c.startswith(".tmp-")] == []


def test_manifest_is_written_last(store, monkeypatch):
    """If uploading/hashing fails after some files were written, no manifest exists."""
    import simu_core.store as mod

    real = mod._sha256_local
    calls = {"n": 0}

    def flaky(path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk error")
        return real(path, **kw)

    monkeypatch.setattr(mod, "_sha256_local", flaky)
    with pytest.raises(OSError, match="disk error"):
        _put(store)
    assert not store.exists("unlearn", _key())
    assert store.get("unlearn", _key()) is None
    assert [c for c in _stage_children(store, "unlearn") if c.startswith(".tmp-")] == []


def test_entry_without_manifest_is_absent_and_overwritten(store):
    key = _key()
    _pipe(store, f"{_entry_path(store, 'unlearn', key)}/a.txt", b"half-written")
    assert store.get("unlearn", key) is None
    ref = _put(store)
    assert store.read_bytes(ref, "a.txt") == b"hello"


# ---------------------------------------------------------------------- corruption


def _pipe(store: ArtifactStore, path: str, data: bytes) -> None:
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


def _alter_one_byte(store: ArtifactStore, path: str) -> None:
    data = bytearray(store.fs.cat_file(path))
    data[0] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))


def test_corrupted_file_is_detected(store):
    ref = _put(store)
    _alter_one_byte(store, f"{_entry_path(store, 'unlearn', ref.key)}/sub/b.bin")
    with pytest.raises(CorruptArtifactError, match=r"sub/b\.bin") as ei:
        store.get("unlearn", ref.key)
    assert ei.value.file == "sub/b.bin" and ei.value.stage == "unlearn" and ei.value.key == ref.key
    assert ref.key in str(ei.value)
    with pytest.raises(CorruptArtifactError, match=r"sub/b\.bin"):
        store.read_bytes(ref, "sub/b.bin")
    # an unverified lookup still finds the entry; size-only check does not notice a same-size edit
    assert store.get("unlearn", ref.key, verify=False) == ref
    assert store.get("unlearn", ref.key, verify="size") == ref


def test_deleted_file_is_detected(store):
    ref = _put(store)
    store.fs.rm_file(f"{_entry_path(store, 'unlearn', ref.key)}/a.txt")
    for verify in (True, "size"):
        with pytest.raises(CorruptArtifactError, match=r"a\.txt.*missing"):
            store.get("unlearn", ref.key, verify=verify)


def test_manifest_from_another_key_is_rejected(store):
    ref = _put(store)
    other = _key(params={"lr": 3.0})
    src = f"{_entry_path(store, 'unlearn', ref.key)}/{MANIFEST_NAME}"
    _pipe(store, f"{_entry_path(store, 'unlearn', other)}/{MANIFEST_NAME}", store.fs.cat_file(src))
    with pytest.raises(CorruptArtifactError, match="manifest belongs to"):
        store.get("unlearn", other)


def test_invalidate_then_reput(store):
    ref = _put(store)
    _alter_one_byte(store, f"{_entry_path(store, 'unlearn', ref.key)}/a.txt")
    with pytest.raises(CorruptArtifactError):
        store.get("unlearn", ref.key)
    assert store.invalidate("unlearn", ref.key) is True
    assert store.get("unlearn", ref.key) is None
    assert store.invalidate("unlearn", ref.key) is False
    with pytest.raises(StaleReferenceError):
        store.read_bytes(ref, "a.txt")
    ref2 = _put(store, files={"a.txt": b"recomputed"})
    assert ref2.key == ref.key and ref2.manifest_sha256 != ref.manifest_sha256
    assert store.get("unlearn", ref.key) == ref2
    assert store.read_bytes(ref2, "a.txt") == b"recomputed"
    with pytest.raises(StaleReferenceError, match="rewritten"):
        store.read_bytes(ref, "a.txt")


def test_first_committed_writer_wins(store):
    ref1 = _put(store, files={"a.txt": b"first"})
    ref2 = _put(store, files={"a.txt": b"second"})
    assert ref2 == ref1
    assert store.read_bytes(ref2, "a.txt") == b"first"


# ----------------------------------------------------------------------- local_dir


def test_local_dir_is_a_readable_folder(store):
    ref = _put(store)
    d = store.local_dir(ref)
    assert d.is_dir()
    assert (d / "a.txt").read_bytes() == b"hello"
    assert (d / "sub" / "b.bin").read_bytes() == b"\x00\x01\x02"
    if store.is_local:
        assert d == Path(_entry_path(store, "unlearn", ref.key))
    else:
        assert store.cache_dir in d.parents  # a verified download
        assert store.local_dir(ref.to_dict()) == d  # reused
        assert store.local_dir(ref, verify=True) == d


def test_local_dir_remote_download_refuses_corrupt_data(tmp_path):
    store = ArtifactStore(f"memory://simu-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "c")
    try:
        ref = _put(store)
        _alter_one_byte(store, f"{_entry_path(store, 'unlearn', ref.key)}/a.txt")
        with pytest.raises(CorruptArtifactError, match=r"a\.txt"):
            store.local_dir(ref)
        assert not list((tmp_path / "c" / "entries").rglob("a.txt"))
    finally:
        store.fs.rm(store.root, recursive=True)


# ---------------------------------------------------------------------- concurrency


def test_concurrent_writers_same_key_leave_one_valid_entry(store):
    n = 6
    barrier = threading.Barrier(n)
    refs: list[ArtifactRef] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with store.writer("unlearn", code_version=CV, params=PARAMS, input_keys=INPUTS) as w:
                w.write_bytes("weights.bin", bytes([i]) * 100_000)
                for j in range(20):  # many files: interleaved commits would mix writers
                    w.write_bytes(f"shards/{j:02d}.bin", bytes([i]) * 1000)
                w.write_bytes("log.txt", f"writer {i}".encode())
                barrier.wait(timeout=10)  # all commit at the same time
            refs.append(w.ref)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(refs) == n and len(set(refs)) == 1  # every writer got the winning entry
    ref = refs[0]
    assert store.get("unlearn", ref.key) == ref  # fully verified
    winner = store.read_bytes(ref, "log.txt").decode()
    i = int(winner.split()[1])
    assert store.read_bytes(ref, "weights.bin") == bytes([i]) * 100_000
    assert store.read_bytes(ref, "shards/07.bin") == bytes([i]) * 1000
    assert _stage_children(store, "unlearn") == [ref.key]  # no temp folders left


def test_clean_temp_removes_leftovers(store):
    ref = _put(store)
    _pipe(store, f"{store.root}/unlearn/.tmp-{ref.key}-dead/x.bin", b"junk")
    assert store.clean_temp(older_than_s=3600) == 0  # too recent
    assert store.clean_temp(older_than_s=0) == 1
    assert _stage_children(store, "unlearn") == [ref.key]
    assert store.get("unlearn", ref.key) == ref


_PROC_WRITER = """
import sys, time, pathlib
from simu_core.store import ArtifactStore
root, go, i = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
store = ArtifactStore(root)
with store.writer("unlearn", code_version={cv!r}, params={params!r}, input_keys={inputs!r}) as w:
    for j in range(10):
        w.write_bytes(f"shards/{{j}}.bin", bytes([i]) * 50_000)
    w.write_bytes("log.txt", f"writer {{i}}".encode())
    while not go.exists():
        time.sleep(0.001)
print(w.ref.manifest_sha256)
""".format(cv=CV, params=PARAMS, inputs=INPUTS)


def test_concurrent_processes_local_store(tmp_path):
    """Processes do not share the in-process lock: the atomic rename must decide."""
    root = tmp_path / "store"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROC_WRITER, str(root), str(go), str(i)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    store = ArtifactStore(str(root))
    ref = store.get("unlearn", _key())
    assert ref is not None
    assert {o[0].strip() for o in outs} == {ref.manifest_sha256}
    i = int(store.read_bytes(ref, "log.txt").decode().split()[1])
    assert all(store.read_bytes(ref, f"shards/{j}.bin") == bytes([i]) * 50_000 for j in range(10))
    assert _stage_children(store, "unlearn") == [ref.key]
