"""Benchmark loaders: TOFU, LUME, MUSE, WMDP and the built-in synthetic one (which benchmark is read how:
:mod:`simu_core.benchmarks.loaders`)."""

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


def load_benchmark(data_config):
    """Load the benchmark a :class:`simu_core.config.DataConfig` names (its registry entry's loader)."""
    from simu_core.benchmarks.loaders import benchmark_loader

    return benchmark_loader(data_config.benchmark).load(data_config)
