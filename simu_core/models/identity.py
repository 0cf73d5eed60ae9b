"""Content identity of a model (or tokenizer) the user brings, for cache keys.

A hub id or path names a model but does not pin it: a local folder can be retrained in place and a
hub repository can get a new revision. :func:`model_fingerprint` returns what the loaded model
actually is: for a local folder, a fingerprint of its files; for a hub id, the commit that
``from_pretrained`` resolves to.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: Files hashed in full whatever their size: they define the architecture and the tokenizer.
METADATA_SUFFIXES = (".json", ".txt", ".model", ".py", ".jinja", ".tiktoken")
#: Weight files up to this size are hashed in full (tiny models: milliseconds).
SMALL_FILE_BYTES = 64 * 2**20
#: Larger files: this many evenly spaced samples of SAMPLE_BYTES each. Retraining changes every
#: sample of a weight file while its size stays the same; hashing a 14 GB 7B model in full would
#: add minutes to every run.
SAMPLES = 16
SAMPLE_BYTES = 64 * 2**10
_CHUNK = 2**20


def _looks_local(reference: str) -> bool:
    # Hub ids look like "org/name"; paths start with /, ., ~ or exist.
    return reference.startswith(("/", ".", "~")) or Path(reference).expanduser().exists()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _sha256_samples(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    stride = (size - SAMPLE_BYTES) // (SAMPLES - 1)
    with path.open("rb") as handle:
        for index in range(SAMPLES):
            handle.seek(index * stride)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> dict[str, Any]:
    """Names and sizes of every file under ``folder``; sha256 of the config, tokenizer and index
    files and of weight files up to SMALL_FILE_BYTES; sampled sha256 of larger files."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {str(root)!r} does not exist")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):
            continue  # .cache/, .git/: not part of what is loaded
        size = path.stat().st_size
        full = path.suffix in METADATA_SUFFIXES or size <= SMALL_FILE_BYTES
        entry = {"name": relative, "size": size}
        entry["sha256" if full else "sha256_sampled"] = _sha256_file(path) if full else _sha256_samples(path, size)
        files.append(entry)
    if not files:
        raise FileNotFoundError(f"model folder {str(root)!r} is empty")
    digest = hashlib.sha256(repr(files).encode()).hexdigest()
    return {"kind": "folder", "files": len(files), "sha256": digest}


def resolve_hub_commit(repo_id: str, revision: str = "main") -> str:
    """The commit sha a hub id resolves to (what ``from_pretrained`` loads).

    Online: asked of the hub. Offline (``HF_HUB_OFFLINE``) or unreachable: the commit of the local
    cache's ref, which is what ``from_pretrained`` then loads. Raises when neither is available.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    error: Exception | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().model_info(repo_id, revision=revision).sha
            if sha:
                return sha
        except Exception as exc:  # network down, gated without a token, unknown repo: try the cache
            error = exc
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    reason = f"the hub lookup failed ({type(error).__name__}: {error})" if error else "offline (HF_HUB_OFFLINE)"
    raise LookupError(f"cannot resolve hub id {repo_id!r} to a commit: {reason} and it is not in the local cache")


def model_fingerprint(reference: str, field: str = "model") -> dict[str, Any]:
    """What a hub id or local path loads: a folder fingerprint or the resolved hub commit.

    ``field`` names the config field in errors (e.g. ``model.target``).
    """
    try:
        if _looks_local(reference):
            return folder_fingerprint(reference)
        return {"kind": "hub", "id": reference, "commit": resolve_hub_commit(reference)}
    except (FileNotFoundError, LookupError) as exc:
        raise ValueError(f"{field}: {exc}") from exc
