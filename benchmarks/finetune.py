"""Fine-tuning throughput of the built-in default: target + retain reference on 2 CPU cores.

Prints tokens/s per training, total wall time and peak RSS, against the targets of the foundation
issue (both trainings within 3 minutes, peak RSS < 2 GB). Usage: ``python benchmarks/finetune.py
[--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from simu_core.config import load_config
from simu_core.stages import prepare_data, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(overrides=args.overrides)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {config.model.tiny}")
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        started = time.perf_counter()
        sizes = prepare_data(config, root / "data")
        print(f"prepare_data: {time.perf_counter() - started:.1f} s, sizes {sizes}")
        total = 0.0
        for which in ("target", "reference"):
            stats = train_model(config, root / "data", root / which, which, progress=False)
            total += stats["wall_seconds"]
            print(f"train {which:9s}: {stats['examples']} examples, {stats['steps']} steps, "
                  f"{stats['wall_seconds']:.1f} s, {stats['tokens_per_second']:.0f} tokens/s, final loss {stats['final_loss']:.4f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"both trainings: {total:.1f} s (target <= 180 s: {'met' if total <= 180 else 'MISSED'})")
    print(f"peak RSS: {peak_mb:.0f} MB (target < 2048 MB: {'met' if peak_mb < 2048 else 'MISSED'})")


if __name__ == "__main__":
    main()
