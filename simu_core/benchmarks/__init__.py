"""The benchmark registry: one entry per benchmark, as the method table is for methods.

:mod:`simu_core.benchmarks.info` is the pure table (names, item kinds, headline and stop measures,
per-benchmark defaults, which data fields the loader reads, what the benchmark supports): the config
validates against it without importing any data or evaluation code. What runs is split by role, one
row per benchmark in each, so that a stage's code version holds only the code it runs (editing an
evaluation suite does not retrain a target): :mod:`~simu_core.benchmarks.loaders` (load from the hub
or a local source, the prepared folder, source checks), :mod:`~simu_core.benchmarks.items` (the
encoded forget and retain items, the fine-tuning sets) and :mod:`~simu_core.benchmarks.suites` (the
evaluation, the stop checks). Adding a benchmark: its loader and evaluation code, and one row in
``info`` and in each role table (a test checks every table has every row).
"""

from simu_core.benchmarks.info import BENCHMARK_INFO, BENCHMARK_NAMES, ITEM_KINDS, BenchmarkInfo, benchmark_info

__all__ = ["BENCHMARK_INFO", "BENCHMARK_NAMES", "ITEM_KINDS", "BenchmarkInfo", "benchmark_info"]
