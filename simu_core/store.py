"""Content-addressed artifact store for pipeline stage outputs.

Every stage output lives under ``<root>/<stage>/<key>/`` where ``key = stage_key(stage,
code_version, params, input_keys)``. The root is any fsspec URL: a local folder (default),
``memory://...`` (tests), ``s3://`` / ``gs://`` (teams; needs s3fs / gcsfs).

An entry is a folder of files plus a ``MANIFEST.json`` that lists every file with its sha256 and
size, and records stage, key, code_version, params, input_keys, created_at and small metadata.
The manifest is the commit marker: an entry exists iff its manifest exists.

Writes are atomic:

* local roots: files go into ``<root>/<stage>/.tmp-<key>-<uuid>/``, the manifest is written
  there last, then the folder is renamed to ``<root>/<stage>/<key>`` (one atomic ``rename``);
* remote roots: files are written to a local staging folder, hashed, uploaded to the remote
  ``.tmp-<key>-<uuid>/`` sibling, moved to the final prefix, and the manifest is written last.
  Object stores cannot rename atomically, so readers ignore an entry without a manifest. Writers
  in one process are serialized per key; two *processes* committing the same key on an object
  store at the same instant can produce a manifest/file mismatch, which readers detect
  (``CorruptArtifactError``) and never treat as a hit.

The first committed writer of a key wins: a later writer of the same key discards its own files
and gets the existing entry's reference. Call :meth:`ArtifactStore.invalidate` to replace it.

Readers verify file hashes against the manifest (``verify=True``) and raise
``CorruptArtifactError`` on a mismatch or a missing file. Pipeline tasks exchange only
:class:`ArtifactRef` values (``ref.to_dict()``): small, JSON-able and content-derived.

This module must not import prefect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "MANIFEST_NAME",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactWriter",
    "CorruptArtifactError",
    "InvalidStoreURLError",
    "StaleReferenceError",
    "StoreError",
    "canonical_json",
    "stage_key",
]

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "simu.artifact/1"
KEY_SCHEMA = "simu.stage_key/1"
MAX_METADATA_BYTES = 64 * 1024
_CHUNK = 8 * 1024 * 1024

_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

Verify = bool | Literal["size"]


# --------------------------------------------------------------------------------------------
# errors


class StoreError(Exception):
    """Base class of artifact store errors."""


class InvalidStoreURLError(StoreError, ValueError):
    """The store URL is empty, has an unknown protocol, or its filesystem is not installed."""


class CorruptArtifactError(StoreError):
    """A committed entry does not match its manifest (altered, missing or foreign file)."""

    def __init__(self, stage: str, key: str, file: str | None, reason: str) -> None:
        self.stage, self.key, self.file, self.reason = stage, key, file, reason
        where = f"file {file!r} of " if file else ""
        super().__init__(
            f"corrupt artifact: {where}stage {stage!r} key {key}: {reason} "
            f"(call store.invalidate({stage!r}, {key!r}) and recompute)"
        )


class StaleReferenceError(StoreError, LookupError):
    """An ArtifactRef no longer resolves: its entry is gone or was replaced by other content."""


# --------------------------------------------------------------------------------------------
# keys


def _canon(value: Any, where: str) -> Any:
    """Return a plain-JSON copy of ``value``; raise TypeError/ValueError naming ``where``."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # plain str, also for str-based enums
    if isinstance(value, int):
        return int(value)  # plain int, also for IntEnum
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}: NaN and infinities are not allowed in keys")
        return 0.0 if value == 0.0 else float(value)  # -0.0 -> 0.0
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, (set, frozenset)):
        raise TypeError(f"{where} is a {type(value).__name__}: pass a sorted list instead")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} has a non-str key {k!r} ({type(k).__name__}); use str keys"
                )
            out[str.__str__(k)] = _canon(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canon(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # numpy scalars and 0-d numpy arrays / torch tensors; arrays and tensors are rejected
    mod = type(value).__module__.split(".")[0]
    if mod in ("numpy", "torch") and hasattr(value, "item"):
        if tuple(getattr(value, "shape", ())) == ():
            return _canon(value.item(), where)
    raise TypeError(
        f"{where} has type {type(value).__module__}.{type(value).__qualname__}, which is not "
        "JSON-able; use str, int, float, bool, None, lists and str-keyed dicts"
    )


def canonical_json(value: Any, *, name: str = "value") -> str:
    """Canonical JSON text of ``value`` (sorted keys, no whitespace, no NaN); ``name`` is
    used in error messages."""
    return json.dumps(
        _canon(value, name),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def _check_stage(stage: Any) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage) or ".." in stage:
        raise ValueError(
            f"invalid stage name {stage!r}: use letters, digits, '_', '-', '.' "
            "(no path separators, no leading '.', no '..', at most 128 characters)"
        )
    return stage


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid artifact key {key!r}: expected a stage_key() hex digest "
            "(letters, digits, '_', '-'; no path separators)"
        )
    return key


def _check_input_keys(input_keys: Any) -> list[str]:
    if isinstance(input_keys, (str, bytes)) or not isinstance(input_keys, Sequence):
        raise TypeError(
            f"input_keys must be a list/tuple of key strings, got {type(input_keys).__name__}"
        )
    out = []
    for i, k in enumerate(input_keys):
        if not isinstance(k, str):
            raise TypeError(f"input_keys[{i}] is {type(k).__name__}, expected str")
        out.append(str.__str__(k))
    return out


def _key_payload(
    stage: str, code_version: str, params: Mapping[str, Any], input_keys: Sequence[str]
) -> dict[str, Any]:
    _check_stage(stage)
    if not isinstance(code_version, str):
        raise TypeError(f"code_version must be a str, got {type(code_version).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    return {
        "schema": KEY_SCHEMA,
        "stage": stage,
        "code_version": str.__str__(code_version),
        "params": _canon(params, "params"),
        "input_keys": _check_input_keys(input_keys),
    }


def stage_key(
    stage: str, code_version: str, params: Mapping[str, Any], input_keys: Sequence[str]
) -> str:
    """sha256 hex key of a stage output.

    Hashes the canonical JSON of (stage, code_version, params, input_keys). Param dict order does
    not matter; ``input_keys`` order does (inputs are positional). Paths become POSIX strings.
    Sets, non-str dict keys, NaN/inf and non-JSON-able values are rejected with an error naming
    the offending key (e.g. ``params.unlearn.lr``).
    """
    payload = _key_payload(stage, code_version, params, input_keys)
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# references


@dataclasses.dataclass(frozen=True)
class ArtifactRef:
    """Small JSON-able, content-derived reference to a committed entry.

    ``manifest_sha256`` is the sha256 of the stored manifest bytes, which list every file's
    sha256, so the reference changes whenever the content does. Pass ``ref.to_dict()`` between
    Prefect tasks; use ``ref.key`` as a downstream ``input_keys`` element.
    """

    stage: str
    key: str
    uri: str
    manifest_sha256: str

    def to_dict(self) -> dict[str, str]:
        """Plain dict ``{"stage", "key", "uri", "manifest_sha256"}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactRef:
        """Inverse of :meth:`to_dict` (also accepts an ArtifactRef)."""
        if isinstance(data, ArtifactRef):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a mapping, got {type(data).__name__}")
        fields = ("stage", "key", "uri", "manifest_sha256")
        missing = [f for f in fields if f not in data]
        extra = sorted(set(data) - set(fields))
        if missing or extra:
            raise ValueError(f"not an ArtifactRef dict: missing {missing}, unexpected {extra}")
        for f in fields:
            if not isinstance(data[f], str):
                raise TypeError(f"ArtifactRef.{f} must be a str, got {type(data[f]).__name__}")
        return cls(**{f: data[f] for f in fields})


# --------------------------------------------------------------------------------------------
# helpers

_LOCK_STRIPES = [threading.Lock() for _ in range(64)]


def _lock_for(*parts: str) -> threading.Lock:
    h = hashlib.sha256("\0".join(parts).encode()).digest()
    return _LOCK_STRIPES[h[0] % len(_LOCK_STRIPES)]


def _check_rel_name(name: Any) -> str:
    """Validate a file name inside an entry (relative POSIX path, no '..')."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid artifact file name {name!r}")
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"artifact file name {name!r} must be a relative POSIX path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact file name {name!r} must not contain '.', '..' or '//'")
    norm = "/".join(parts)
    if norm == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME!r} is reserved for the store's manifest")
    return norm


def _sha256_local(path: str | os.PathLike[str], *, fsync: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
    return h.hexdigest(), size


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def _rmtree_quiet(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# writer


class ArtifactWriter:
    """Collects the files of one entry in a local temporary folder; commits on successful exit.

    Obtain it from :meth:`ArtifactStore.writer`. ``w.path(name)`` returns a local path to write
    (parent folders are created; it may also be used as a folder, e.g. for ``save_pretrained``).
    ``w.metadata`` is a small JSON-able dict stored in the manifest. After the ``with`` block,
    ``w.ref`` is the committed :class:`ArtifactRef`.
    """

    def __init__(
        self,
        store: ArtifactStore,
        stage: str,
        key: str,
        *,
        code_version: str,
        params: Mapping[str, Any],
        input_keys: Sequence[str],
        metadata: Mapping[str, Any] | None,
    ) -> None:
        self._store = store
        self.stage = stage
        self.key = key
        self._payload = _key_payload(stage, code_version, params, input_keys)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.ref: ArtifactRef | None = None
        self._dir: Path | None = None

    # -- context manager
    def __enter__(self) -> ArtifactWriter:
        self._dir = self._store._new_staging_dir(self.stage, self.key)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        assert self._dir is not None
        try:
            if exc_type is None:
                self.ref = self._store._commit(self)
        finally:
            if self._dir.exists():
                _rmtree_quiet(self._dir)
            self._dir = None
        return False

    # -- writing
    @property
    def dir(self) -> Path:
        """The local temporary folder holding this entry's files."""
        if self._dir is None:
            raise StoreError("ArtifactWriter is only usable inside its 'with' block")
        return self._dir

    def path(self, name: str) -> Path:
        """Local path for file (or folder) ``name`` inside the entry; parents are created."""
        rel = _check_rel_name(name)
        p = self.dir.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` to file ``name``."""
        p = self.path(name)
        p.write_bytes(bytes(data))
        return p

    def write_text(self, name: str, text: str) -> Path:
        """Write UTF-8 ``text`` to file ``name``."""
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as canonical-ish, indented JSON (no NaN)."""
        return self.write_text(
            name, json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"
        )

    def write_parquet(self, name: str, df: pd.DataFrame, **kwargs: Any) -> Path:
        """Write a pandas DataFrame to Parquet file ``name`` (kwargs go to ``to_parquet``)."""
        p = self.path(name)
        df.to_parquet(p, **kwargs)
        return p

    # -- used by the store
    def _files(self) -> dict[str, Path]:
        root = self.dir
        out: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for d in dirnames:
                if os.path.islink(os.path.join(dirpath, d)):
                    raise StoreError(f"symlinks are not supported in artifacts: {d!r}")
            for fn in filenames:
                full = Path(dirpath, fn)
                rel = full.relative_to(root).as_posix()
                if full.is_symlink() or not full.is_file():
                    raise StoreError(f"artifact file {rel!r} is not a regular file")
                if rel == MANIFEST_NAME:
                    raise StoreError(f"{MANIFEST_NAME!r} is reserved for the store's manifest")
                out[rel] = full
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# store


class ArtifactStore:
    """Content-addressed store rooted at an fsspec URL (local path, ``memory://``, ``s3://``...).

    ``cache_dir`` (local) holds staging folders for remote writes and verified downloads for
    :meth:`local_dir`; default ``$SIMU_STORE_CACHE`` or ``~/.cache/simu/store``.
    ``storage_options`` are passed to fsspec.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        **storage_options: Any,
    ) -> None:
        if isinstance(url, PurePath):
            url = str(url)
        if not isinstance(url, str):
            raise InvalidStoreURLError(f"store URL must be a str or Path, got {type(url)!r}")
        if not url.strip():
            raise InvalidStoreURLError("store URL is empty")
        try:
            fs, path = url_to_fs(url, **storage_options)
        except ImportError as e:
            raise InvalidStoreURLError(f"store URL {url!r}: filesystem not available: {e}") from e
        except (ValueError, TypeError) as e:
            raise InvalidStoreURLError(f"store URL {url!r} is not valid: {e}") from e
        self.fs: fsspec.AbstractFileSystem = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            path = os.path.abspath(os.path.expanduser(path))
            if os.path.exists(path) and not os.path.isdir(path):
                raise InvalidStoreURLError(f"store root {path!r} exists and is not a folder")
            os.makedirs(path, exist_ok=True)
            self.root = Path(path).as_posix()
        else:
            self.root = path.rstrip("/")
        self.url = url
        self.root_uri = (
            self.fs.unstrip_protocol(self.root) if self.root else self.fs.unstrip_protocol("")
        )
        if cache_dir is None:
            cache_dir = os.environ.get("SIMU_STORE_CACHE") or os.path.join(
                os.path.expanduser("~"), ".cache", "simu", "store"
            )
        self.cache_dir = Path(cache_dir).expanduser().resolve()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_uri!r})"

    # -- paths
    def _stage_dir(self, stage: str) -> str:
        return f"{self.root}/{_check_stage(stage)}"

    def _entry(self, stage: str, key: str) -> str:
        return f"{self._stage_dir(stage)}/{_check_key(key)}"

    def uri(self, stage: str, key: str) -> str:
        """Full URI of the folder of entry (stage, key)."""
        return self.fs.unstrip_protocol(self._entry(stage, key))

    # -- writing
    def writer(
        self,
        stage: str,
        key: str | None = None,
        *,
        code_version: str,
        params: Mapping[str, Any],
        input_keys: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> ArtifactWriter:
        """Context manager writing one entry; commits on successful exit, discards on error.

        ``key`` defaults to ``stage_key(stage, code_version, params, input_keys)``; a key that
        does not match those values is rejected (ValueError).
        """
        expected = stage_key(stage, code_version, params, input_keys)
        if key is None:
            key = expected
        _check_key(key)
        if key != expected:
            raise ValueError(
                f"key {key} does not match stage_key({stage!r}, code_version, params, "
                f"input_keys) = {expected}"
            )
        return ArtifactWriter(
            self,
            stage,
            key,
            code_version=code_version,
            params=params,
            input_keys=input_keys,
            metadata=metadata,
        )

    def put(
        self,
        stage: str,
        key: str | None,
        files: Mapping[str, bytes] | Callable[[ArtifactWriter], None],
        *,
        code_version: str,
        params: Mapping[str, Any],
        input_keys: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> ArtifactRef:
        """Commit an entry from ``{name: bytes}`` or a callback ``fn(writer)``; return its ref."""
        w = self.writer(
            stage,
            key,
            code_version=code_version,
            params=params,
            input_keys=input_keys,
            metadata=metadata,
        )
        with w:
            if callable(files):
                files(w)
            elif isinstance(files, Mapping):
                for name, data in files.items():
                    if not isinstance(data, (bytes, bytearray, memoryview)):
                        raise TypeError(f"file {name!r}: expected bytes, got {type(data).__name__}")
                    w.write_bytes(name, bytes(data))
            else:
                raise TypeError("files must be a mapping name -> bytes or a callable(writer)")
        assert w.ref is not None
        return w.ref

    def _new_staging_dir(self, stage: str, key: str) -> Path:
        name = f".tmp-{key}-{uuid.uuid4().hex}"
        if self.is_local:
            d = Path(self._stage_dir(stage)) / name
            d.mkdir(parents=True)
        else:
            base = self.cache_dir / "staging" / stage
            base.mkdir(parents=True, exist_ok=True)
            d = base / name
            d.mkdir()
        return d

    def _build_manifest(self, w: ArtifactWriter, files: dict[str, Path]) -> dict[str, Any]:
        metadata = _canon(w.metadata, "metadata")
        if len(canonical_json(metadata)) > MAX_METADATA_BYTES:
            raise ValueError(
                f"metadata is larger than {MAX_METADATA_BYTES} bytes; store data in a file"
            )
        entries = {}
        for rel, full in files.items():
            sha, size = _sha256_local(full, fsync=self.is_local)
            entries[rel] = {"sha256": sha, "size": size}
        p = w._payload
        return {
            "format": MANIFEST_FORMAT,
            "stage": w.stage,
            "key": w.key,
            "code_version": p["code_version"],
            "params": p["params"],
            "input_keys": p["input_keys"],
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "metadata": metadata,
            "files": entries,
        }

    def _commit(self, w: ArtifactWriter) -> ArtifactRef:
        files = w._files()
        manifest = self._build_manifest(w, files)
        mbytes = _manifest_bytes(manifest)
        if self.is_local:
            return self._commit_local(w, mbytes)
        return self._commit_remote(w, files, mbytes)

    def _commit_local(self, w: ArtifactWriter, mbytes: bytes) -> ArtifactRef:
        tmp = w.dir
        final = self._entry(w.stage, w.key)
        with open(tmp / MANIFEST_NAME, "wb") as f:  # written last, inside the temp folder
            f.write(mbytes)
            f.flush()
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        with _lock_for(self.root_uri, w.stage, w.key):
            for _ in range(5):
                try:
                    os.rename(tmp, final)  # atomic; fails if `final` is a non-empty folder
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES) and not (
                        isinstance(e, (FileExistsError, PermissionError))
                    ):
                        raise
                else:
                    _fsync_dir(os.path.dirname(final))
                    return self._make_ref(w.stage, w.key, mbytes)
                # Someone committed first (or left a broken folder): keep a valid entry.
                try:
                    existing = self.get(w.stage, w.key, verify=True)
                except CorruptArtifactError:
                    existing = None
                if existing is not None:
                    return existing
                self._remove_local_entry(w.stage, w.key)
        raise StoreError(f"could not commit stage {w.stage!r} key {w.key}: folder keeps reappearing")

    def _commit_remote(
        self, w: ArtifactWriter, files: dict[str, Path], mbytes: bytes
    ) -> ArtifactRef:
        fs = self.fs
        stage_dir = self._stage_dir(w.stage)
        final = self._entry(w.stage, w.key)
        rtmp = f"{stage_dir}/{w.dir.name}"
        with _lock_for(self.root_uri, w.stage, w.key):
            existing = self._existing_or_none(w.stage, w.key)
            if existing is not None:
                return existing
            try:
                for rel, full in files.items():  # upload into the temporary sibling
                    fs.makedirs(f"{rtmp}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                    fs.put_file(str(full), f"{rtmp}/{rel}")
                if fs.exists(final):  # uncommitted leftovers of a crashed writer
                    fs.rm(final, recursive=True)
                for rel in files:
                    fs.makedirs(f"{final}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                    fs.mv(f"{rtmp}/{rel}", f"{final}/{rel}")
                fs.pipe_file(f"{final}/{MANIFEST_NAME}", mbytes)  # commit marker, last
            finally:
                with contextlib.suppress(FileNotFoundError, OSError):
                    if fs.exists(rtmp):
                        fs.rm(rtmp, recursive=True)
        return self._make_ref(w.stage, w.key, mbytes)

    def _existing_or_none(self, stage: str, key: str) -> ArtifactRef | None:
        try:
            return self.get(stage, key, verify="size")
        except CorruptArtifactError:
            return None

    def _make_ref(self, stage: str, key: str, mbytes: bytes) -> ArtifactRef:
        return ArtifactRef(
            stage=stage,
            key=key,
            uri=self.uri(stage, key),
            manifest_sha256=hashlib.sha256(mbytes).hexdigest(),
        )

    # -- reading
    def _read_manifest(self, stage: str, key: str) -> tuple[dict[str, Any], bytes] | None:
        path = f"{self._entry(stage, key)}/{MANIFEST_NAME}"
        try:
            mbytes = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(mbytes)
        except ValueError as e:
            raise CorruptArtifactError(stage, key, MANIFEST_NAME, f"unreadable JSON ({e})") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CorruptArtifactError(stage, key, MANIFEST_NAME, "not a manifest")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise CorruptArtifactError(
                stage, key, MANIFEST_NAME, f"unknown format {manifest.get('format')!r}"
            )
        if manifest.get("stage") != stage or manifest.get("key") != key:
            raise CorruptArtifactError(
                stage,
                key,
                MANIFEST_NAME,
                f"manifest belongs to stage {manifest.get('stage')!r} "
                f"key {manifest.get('key')!r}",
            )
        return manifest, mbytes

    def _verify_file(
        self, stage: str, key: str, rel: str, spec: Mapping[str, Any], verify: Verify
    ) -> None:
        path = f"{self._entry(stage, key)}/{rel}"
        try:
            if verify == "size":
                size = self.fs.size(path)
                if size != spec.get("size"):
                    raise CorruptArtifactError(
                        stage, key, rel, f"size {size} != manifest size {spec.get('size')}"
                    )
                return
            h = hashlib.sha256()
            size = 0
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError as e:
            raise CorruptArtifactError(stage, key, rel, "file is missing") from e
        if size != spec.get("size") or h.hexdigest() != spec.get("sha256"):
            raise CorruptArtifactError(
                stage, key, rel, f"sha256/size mismatch (got {h.hexdigest()[:12]}..., {size} B)"
            )

    def get(self, stage: str, key: str, *, verify: Verify = True) -> ArtifactRef | None:
        """Reference to committed entry (stage, key), or None when absent.

        ``verify=True`` re-hashes every file against the manifest, ``"size"`` checks presence and
        sizes only, ``False`` trusts the manifest. Raises CorruptArtifactError on a mismatch.
        """
        got = self._read_manifest(stage, key)
        if got is None:
            return None
        manifest, mbytes = got
        if verify:
            for rel, spec in manifest["files"].items():
                self._verify_file(stage, key, rel, spec, verify)
        return self._make_ref(stage, key, mbytes)

    def exists(self, stage: str, key: str) -> bool:
        """True when a committed manifest exists (files are not verified)."""
        return self.fs.exists(f"{self._entry(stage, key)}/{MANIFEST_NAME}")

    def manifest(self, ref: ArtifactRef | Mapping[str, Any]) -> dict[str, Any]:
        """The manifest of ``ref``'s entry; StaleReferenceError if it no longer matches."""
        return self._resolve(ArtifactRef.from_dict(ref))

    def _resolve(self, ref: ArtifactRef) -> dict[str, Any]:
        got = self._read_manifest(ref.stage, ref.key)
        if got is None:
            raise StaleReferenceError(
                f"stage {ref.stage!r} key {ref.key} is not in store {self.root_uri}"
            )
        manifest, mbytes = got
        if hashlib.sha256(mbytes).hexdigest() != ref.manifest_sha256:
            raise StaleReferenceError(
                f"stage {ref.stage!r} key {ref.key} was rewritten since this reference was made"
            )
        return manifest

    def read_bytes(self, ref: ArtifactRef | Mapping[str, Any], name: str) -> bytes:
        """Contents of file ``name`` of ``ref``, verified against the manifest."""
        ref = ArtifactRef.from_dict(ref)
        manifest = self._resolve(ref)
        rel = _check_rel_name(name)
        spec = manifest["files"].get(rel)
        if spec is None:
            raise KeyError(f"stage {ref.stage!r} key {ref.key} has no file {rel!r}")
        try:
            data = self.fs.cat_file(f"{self._entry(ref.stage, ref.key)}/{rel}")
        except FileNotFoundError as e:
            raise CorruptArtifactError(ref.stage, ref.key, rel, "file is missing") from e
        if len(data) != spec["size"] or hashlib.sha256(data).hexdigest() != spec["sha256"]:
            raise CorruptArtifactError(ref.stage, ref.key, rel, "sha256/size mismatch")
        return data

    def read_json(self, ref: ArtifactRef | Mapping[str, Any], name: str) -> Any:
        """Parsed JSON file ``name`` of ``ref`` (verified)."""
        return json.loads(self.read_bytes(ref, name))

    def read_parquet(
        self, ref: ArtifactRef | Mapping[str, Any], name: str, **kwargs: Any
    ) -> pd.DataFrame:
        """pandas DataFrame from Parquet file ``name`` of ``ref`` (verified)."""
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.read_bytes(ref, name)), **kwargs)

    def local_dir(self, ref: ArtifactRef | Mapping[str, Any], *, verify: bool = False) -> Path:
        """Local folder holding ``ref``'s files (e.g. for ``from_pretrained``).

        Local stores: the entry folder itself (``verify=True`` re-hashes it). Remote stores: a
        cached copy under ``cache_dir``, downloaded and verified once per manifest.
        Treat the folder as read-only.
        """
        ref = ArtifactRef.from_dict(ref)
        manifest = self._resolve(ref)
        if self.is_local:
            if verify:
                for rel, spec in manifest["files"].items():
                    self._verify_file(ref.stage, ref.key, rel, spec, True)
            return Path(self._entry(ref.stage, ref.key))
        final = self._cache_entry_dir(ref)
        if (final / MANIFEST_NAME).is_file():
            if not verify:
                return final
            try:
                for rel, spec in manifest["files"].items():
                    sha, size = _sha256_local(final / rel)
                    if sha != spec["sha256"] or size != spec["size"]:
                        raise CorruptArtifactError(ref.stage, ref.key, rel, "cached copy differs")
                return final
            except (CorruptArtifactError, FileNotFoundError):
                _rmtree_quiet(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            src = self._entry(ref.stage, ref.key)
            for rel, spec in manifest["files"].items():
                dst = tmp.joinpath(*rel.split("/"))
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{src}/{rel}", str(dst))
                except FileNotFoundError as e:
                    raise CorruptArtifactError(ref.stage, ref.key, rel, "file is missing") from e
                sha, size = _sha256_local(dst)
                if sha != spec["sha256"] or size != spec["size"]:
                    raise CorruptArtifactError(ref.stage, ref.key, rel, "sha256/size mismatch")
            (tmp / MANIFEST_NAME).write_bytes(_manifest_bytes(manifest))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST_NAME).is_file():  # another thread won the race
                    raise
        finally:
            _rmtree_quiet(tmp)
        return final

    def _cache_stage_dir(self, stage: str) -> Path:
        root_id = hashlib.sha256(self.root_uri.encode()).hexdigest()[:16]
        return self.cache_dir / "entries" / root_id / _check_stage(stage)

    def _cache_entry_dir(self, ref: ArtifactRef) -> Path:
        return self._cache_stage_dir(ref.stage) / f"{ref.key}-{ref.manifest_sha256[:16]}"


    # -- maintenance
    def _remove_local_entry(self, stage: str, key: str) -> None:
        final = self._entry(stage, key)
        trash = f"{self._stage_dir(stage)}/.trash-{key}-{uuid.uuid4().hex}"
        try:
            os.rename(final, trash)  # disappears atomically
        except FileNotFoundError:
            return
        _rmtree_quiet(trash)

    def invalidate(self, stage: str, key: str) -> bool:
        """Remove entry (stage, key) (e.g. a corrupt one) so it can be recomputed.

        Returns True when something was removed. Cached local copies are removed too.
        """
        final = self._entry(stage, key)
        with _lock_for(self.root_uri, stage, key):
            if self.is_local:
                existed = os.path.exists(final)
                self._remove_local_entry(stage, key)
            else:
                existed = self.fs.exists(final)
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{final}/{MANIFEST_NAME}")  # uncommit first
                if existed:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(final, recursive=True)
        if not self.is_local:
            for p in self._cache_stage_dir(stage).glob(f"{key}-*"):
                _rmtree_quiet(p)
        return existed

    def keys(self, stage: str) -> list[str]:
        """Keys of committed entries of ``stage`` (sorted)."""
        sdir = self._stage_dir(stage)
        try:
            names = self.fs.ls(sdir, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            k = n.rstrip("/").rsplit("/", 1)[-1]
            if not k.startswith(".") and self.fs.exists(f"{sdir}/{k}/{MANIFEST_NAME}"):
                out.append(k)
        return sorted(out)

    def clean_temp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temporary/trash folders left by crashed writers; returns how many.

        Only folders whose newest file is older than ``older_than_s`` are removed (0 removes all;
        do not use 0 while writers may be running).
        """
        removed = 0
        now = time.time()
        try:
            stages = self.fs.ls(self.root or "/", detail=False)
        except FileNotFoundError:
            return 0
        for s in stages:
            s = s.rstrip("/")
            try:
                children = self.fs.ls(s, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for c in children:
                c = c.rstrip("/")
                name = c.rsplit("/", 1)[-1]
                if not (name.startswith(".tmp-") or name.startswith(".trash-")):
                    continue
                if older_than_s > 0 and self._newest_mtime(c, default=now) > now - older_than_s:
                    continue
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.rm(c, recursive=True)
                    removed += 1
        if not self.is_local:  # local staging folders of remote writes
            for d in (self.cache_dir / "staging").glob("*/.tmp-*"):
                newest = max(
                    (p.stat().st_mtime for p in [d, *d.rglob("*")] if p.exists()), default=now
                )
                if older_than_s <= 0 or newest <= now - older_than_s:
                    _rmtree_quiet(d)
                    removed += 1
        return removed

    def _newest_mtime(self, path: str, default: float) -> float:
        newest = None
        try:
            paths = [path, *self.fs.find(path)]
        except (FileNotFoundError, OSError):
            return default
        for p in paths:
            try:
                m = self.fs.modified(p)
            except (NotImplementedError, FileNotFoundError, OSError, KeyError):
                continue
            t = m.timestamp()
            newest = t if newest is None else max(newest, t)
        return default if newest is None else newest
