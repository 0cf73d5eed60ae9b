"""Each benchmark's loader: from the hub or ``data.source`` to the prepared folder and back.

A row per benchmark of :data:`LOADERS` (one per row of :data:`simu_core.benchmarks.info.BENCHMARK_INFO`):
``load(data_config)`` (the ``prepare_data`` stage), ``save(benchmark, folder)`` / ``read(folder)``
(the prepared folder every later stage reads; ``marker``, the file ``save`` writes, tells the
benchmarks' folders apart) and ``check_source(data_config)`` (problems with a local
``data.source`` found before any stage runs). The registry is split by role (loaders here, item
encoders in :mod:`~simu_core.benchmarks.items`, evaluation suites in
:mod:`~simu_core.benchmarks.suites`) so that a stage's code version holds only the code it runs:
editing an evaluation suite does not retrain a target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from simu_core.benchmarks.info import role_table, table_row

if TYPE_CHECKING:
    from simu_core.config import DataConfig


@dataclass(frozen=True)
class Loader:
    """How one benchmark is loaded, saved, read back and checked (module docstring)."""

    load: Callable[[DataConfig], Any]
    save: Callable[[Any, Path], None]
    read: Callable[[Path], Any]
    marker: str
    check_source: Callable[[DataConfig], list[str]]


def _load_synthetic(data: DataConfig):
    from simu_core.data import generate_synthetic

    return generate_synthetic(split=data.split, num_authors=data.num_authors, holdout_authors=data.holdout_authors,
                              qa_per_author=data.qa_per_author, general_facts=data.general_facts,
                              retain_authors=data.retain_authors, seed=data.seed)


def _load_tofu(data: DataConfig):
    from simu_core.data import load_tofu

    return load_tofu(data.split, data.source, data.retain_authors)


def _read_qa(folder: Path):
    from simu_core.data import QABenchmark

    return QABenchmark.load(folder)


def _no_source(data: DataConfig) -> list[str]:
    return []


def _check_tofu_source(data: DataConfig) -> list[str]:
    from simu_core.data.tofu import TOFU_PAIRING

    folder = Path(data.source).expanduser()
    if not folder.is_dir():
        return [f"data.source: folder {str(folder)!r} does not exist"]
    retain, holdout = TOFU_PAIRING[data.split]
    needed = [f"{data.split}.json", f"{data.split}_perturbed.json", f"{retain}.json", f"{holdout}.json",
              "retain_perturbed.json", "real_authors_perturbed.json", "world_facts_perturbed.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    return [f"data.source: TOFU folder {str(folder)!r} lacks {missing}"] if missing else []


def _load_lume(data: DataConfig):
    from simu_core.data import load_lume

    return load_lume(data.source)


def _save_lume(benchmark, folder: Path) -> None:
    benchmark.rows.to_parquet(folder / "rows.parquet", index=False)
    benchmark.mia_member.to_parquet(folder / "mia_member.parquet", index=False)
    benchmark.mia_nonmember.to_parquet(folder / "mia_nonmember.parquet", index=False)


def _read_lume(folder: Path):
    from simu_core.data import LumeBenchmark

    return LumeBenchmark(rows=pd.read_parquet(folder / "rows.parquet"),
                         mia_member=pd.read_parquet(folder / "mia_member.parquet"),
                         mia_nonmember=pd.read_parquet(folder / "mia_nonmember.parquet"))


def _check_lume_source(data: DataConfig) -> list[str]:
    folder = Path(data.source).expanduser()
    if not folder.is_dir():
        return [f"data.source: folder {str(folder)!r} does not exist"]
    missing = [name for name in ("mia_member.jsonl", "mia_nonmember.jsonl") if not (folder / name).is_file()]
    for split in ("forget", "retain"):
        if not (folder / f"{split}.jsonl").is_file() and not list(folder.glob(f"data/{split}-*.parquet")):
            missing.append(f"{split}.jsonl")
    return [f"data.source: LUME folder {str(folder)!r} lacks {sorted(missing)}"] if missing else []


def _load_muse(data: DataConfig):
    from simu_core.data.muse import DEFAULT_RETAIN_SPLIT, load_muse

    benchmark = load_muse(data.corpus, data.source, retain_split=data.retain_split or DEFAULT_RETAIN_SPLIT)
    if data.max_texts is not None:
        benchmark = muse_head(benchmark, data.max_texts)
    if data.forget_text == "excerpts":
        benchmark = muse_with_excerpts(benchmark)
    return benchmark


def muse_head(benchmark, count: int):
    """The first ``count`` texts of each corpus and of each evaluation set (the in-context
    examples stay whole): a small run's benchmark."""
    frames = ("verbmem_forget", "knowmem_forget", "knowmem_retain")
    texts = ("forget_chunks", "retain_chunks", "privleak_forget", "privleak_holdout", "privleak_retain")
    return replace(benchmark, **{name: getattr(benchmark, name).head(count).reset_index(drop=True) for name in frames},
                   **{name: list(getattr(benchmark, name))[:count] for name in texts})


def muse_with_excerpts(benchmark):
    """The forget texts replaced by the forget-corpus passages the evaluation reads: each VerbMem
    prompt with its true continuation (``prompt + gt``: the excerpt as it stands in the corpus) and
    each PrivLeak member. A model trained on them is measured on what it saw."""
    verbmem = benchmark.verbmem_forget
    excerpts = [prompt + gt for prompt, gt in zip(verbmem["prompt"], verbmem["gt"])] + list(benchmark.privleak_forget)
    return replace(benchmark, forget_chunks=excerpts)


def _read_muse(folder: Path):
    from simu_core.data.muse import MuseBenchmark

    return MuseBenchmark.load(folder)


def _check_muse_source(data: DataConfig) -> list[str]:
    folder = Path(data.source).expanduser()
    return [] if folder.is_dir() else [f"data.source: MUSE folder {str(folder)!r} does not exist"]


def _load_wmdp(data: DataConfig):
    """The questions, and the corpora when ``data.corpora_source`` names them (``hub``: cais/wmdp-corpora;
    a folder): ``simu eval`` reads no corpus, unlearning reads both (the config refuses it without)."""
    from simu_core.data.wmdp import load_wmdp

    corpora = data.corpora_source
    benchmark = load_wmdp(data.subset, data.source, None if corpora in (None, "hub") else corpora,
                          need_corpora=corpora is not None)
    if data.max_texts is not None:
        benchmark = replace(benchmark, forget_corpus=list(benchmark.forget_corpus)[:data.max_texts],
                            retain_corpus=list(benchmark.retain_corpus)[:data.max_texts])
    return benchmark


def _read_wmdp(folder: Path):
    from simu_core.data.wmdp import WMDPBenchmark

    return WMDPBenchmark.load(folder)


def _check_wmdp_source(data: DataConfig) -> list[str]:
    problems = []
    source = Path(data.source).expanduser()
    if data.source is not None and not source.exists():
        problems.append(f"data.source: WMDP questions {str(source)!r} (a JSON Lines file or a folder in the hub "
                        "layout) do not exist")
    if data.corpora_source not in (None, "hub") and not Path(data.corpora_source).expanduser().is_dir():
        problems.append(f"data.corpora_source: folder {data.corpora_source!r} does not exist")
    return problems


def _save_method(benchmark, folder: Path) -> None:
    benchmark.save(folder)


LOADERS: dict[str, Loader] = role_table({
    "synthetic": Loader(_load_synthetic, _save_method, _read_qa, "benchmark.txt", _no_source),
    "tofu": Loader(_load_tofu, _save_method, _read_qa, "benchmark.txt", _check_tofu_source),
    "lume": Loader(_load_lume, _save_lume, _read_lume, "rows.parquet", _check_lume_source),
    "muse": Loader(_load_muse, _save_method, _read_muse, "muse.json", _check_muse_source),
    "wmdp": Loader(_load_wmdp, _save_method, _read_wmdp, "wmdp.json", _check_wmdp_source),
}, "loaders")


def benchmark_loader(name: str) -> Loader:
    """The loader of ``name``; a ValueError names the known benchmarks."""
    return table_row(LOADERS, name)


def read_prepared(folder: str | Path) -> Any:
    """The benchmark a prepared folder holds (told by the file its loader's ``save`` writes)."""
    folder = Path(folder)
    for loader in LOADERS.values():
        if (folder / loader.marker).exists():
            return loader.read(folder)
    raise FileNotFoundError(f"{str(folder)!r} holds no prepared benchmark (none of "
                            f"{sorted({loader.marker for loader in LOADERS.values()})})")
