"""Cost of the knockout stage, in seconds and in forward passes over its items.

    python benchmarks/knockout.py [--config data/configs/mlp_localised.yaml] [--workdir DIR]
                                  [--threads T] [--repeats R]

Prepares the config's benchmark and trains its target into ``--workdir`` (reused when there;
about a minute and a half on 2 cores for the built-in model), attributes forget and retain,
thresholds (``simu_core.stages``), then in one process:

- one forward pass over the knockout items (forget + retain) with the intact model, median of
  ``--repeats``: the unit;
- the knockout check without the curve (intact + critical + random draws + retain-critical) and
  with the configured curve, median of ``--repeats`` each, as seconds and as multiples of the unit.

Target: the check without the curve costs at most 1 + (number of sets x draws) forward passes
(3 sets, ``knockout.random_draws`` draws); it runs 1 + 1 + draws + 1 (only the random set is drawn).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simu_core import stages  # noqa: E402
from simu_core.attribution import scores_from_table  # noqa: E402
from simu_core.config import load_config  # noqa: E402
from simu_core.knockout import (  # noqa: E402
    format_summary,
    knockout_check,
    knockout_sets_from_mask_table,
    mean_answer_logprobs,
)
from simu_core.prompting import pad_token_id  # noqa: E402


def median_seconds(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "data" / "configs" / "mlp_localised.yaml"))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "simu-knockout-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    work = Path(args.workdir)
    data, target = work / "data", work / "target"
    if not (data / "sizes.json").exists():
        stages.prepare_data(config, data)
    if not (target / "stats.json").exists():
        print("training the target (once)...", flush=True)
        stages.train_model(config, data, target, "target", progress=False)
    for which in ("forget", "retain"):
        if not (work / which / stages.SCORES_FILE).exists():
            stages.attribute(config, data, target, work / which, which, progress=False)
    stages.threshold_mask(config, work / "forget", work / "retain", work / "mask")

    model, tokenizer = stages.load_trained(target, config)
    forget, retain = stages._knockout_items(config, stages.read_benchmark(data), tokenizer)
    items, pad = forget + retain, pad_token_id(tokenizer)
    scores = pd.read_parquet(work / "mask" / stages.SCORES_FILE)
    critical = knockout_sets_from_mask_table(pd.read_parquet(work / "mask" / stages.MASK_FILE), config.mask.variant)
    settings = config.knockout
    common = dict(retain_scores=scores_from_table(scores, "retain_score"),
                  forget_scores=scores_from_table(scores, "selection_score"), random_draws=settings.random_draws,
                  curve_draws=settings.curve_draws, seed=config.run.seed, batch_size=settings.batch_size)

    mean_answer_logprobs(model, items, pad, settings.batch_size)  # warm-up
    unit, _ = median_seconds(lambda: mean_answer_logprobs(model, items, pad, settings.batch_size), args.repeats)
    plain, result = median_seconds(lambda: knockout_check(model, forget, retain, pad, critical, **common), args.repeats)
    with_curve, curved = median_seconds(
        lambda: knockout_check(model, forget, retain, pad, critical, curve_sizes=settings.curve_sizes, **common),
        args.repeats)
    allowed = 1 + 3 * settings.random_draws  # the bound: 1 + (number of sets x draws)
    print(f"config: {args.config}; {len(forget)} forget + {len(retain)} retain items; torch threads {args.threads}")
    print("\n".join(format_summary(result.summary)))
    print(f"one forward pass over the items: {unit:.3f} s (median of {args.repeats})")
    print(f"knockout without curve: {plain:.3f} s = {plain / unit:.2f} forward passes "
          f"({result.forward_passes} passes run; target <= {allowed})")
    print(f"knockout with curve {settings.curve_sizes} x (1 + {settings.curve_draws} draws): {with_curve:.3f} s = "
          f"{with_curve / unit:.2f} forward passes ({curved.forward_passes} passes run)")


if __name__ == "__main__":
    main()
