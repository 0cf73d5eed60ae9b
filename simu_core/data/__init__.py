"""Benchmarks: TOFU, LUME and the built-in synthetic one, in one QA schema."""

from simu_core.data.jsonl import DataFileError, read_jsonl
from simu_core.data.lume import LumeBenchmark, load_lume
from simu_core.data.schema import QABenchmark
from simu_core.data.synthetic import generate_synthetic
from simu_core.data.tofu import TOFU_CONFIGS, load_tofu, load_tofu_config

__all__ = [
    "DataFileError",
    "LumeBenchmark",
    "QABenchmark",
    "TOFU_CONFIGS",
    "generate_synthetic",
    "load_benchmark",
    "load_lume",
    "load_tofu",
    "load_tofu_config",
    "read_jsonl",
]


def load_benchmark(data_config) -> QABenchmark | LumeBenchmark:
    """Load the benchmark a :class:`simu_core.config.DataConfig` names."""
    if data_config.benchmark == "synthetic":
        return generate_synthetic(
            split=data_config.split,
            num_authors=data_config.num_authors,
            holdout_authors=data_config.holdout_authors,
            qa_per_author=data_config.qa_per_author,
            general_facts=data_config.general_facts,
            retain_authors=data_config.retain_authors,
            seed=data_config.seed,
        )
    if data_config.benchmark == "tofu":
        return load_tofu(data_config.split, data_config.source, data_config.retain_authors)
    if data_config.benchmark == "lume":
        return load_lume(data_config.source)
    raise ValueError(f"data.benchmark: unknown benchmark {data_config.benchmark!r}")
