"""Cost of the knockout stage, in seconds and in forward passes over its items.

    python benchmarks/knockout.py [--config data/configs/mlp_localised.yaml] [--workdir DIR]
                                  [--threads T] [--repeats R]

Prepares the config's benchmark and trains its target into ``--workdir`` (reused when there;
about a minute and a half on 2 cores for the built-in model), runs the knockout stage once (its
own attribution and threshold on half of the items, ``simu_core.stages.knockout``: timed whole),
then in one process on the held-out items the stage measured:

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
    stage = stages.knockout(config, data, target, work / "knockout", progress=False)

    model, tokenizer = stages.load_trained(target, config)
    benchmark, roles = stages.read_benchmark(data), pd.read_parquet(work / "knockout" / "knockout_items.parquet")

    def measured(split: str) -> list:
        ids = set(roles[(roles["split"] == split) & (roles["role"] == "measured")]["item_id"])
        frame = benchmark[split]
        return stages._encoded_items(config, frame[frame["item_id"].astype(str).isin(ids)], False, tokenizer)[0]

    forget, retain = measured("forget"), measured("retain")
    items, pad = forget + retain, pad_token_id(tokenizer)
    table = pd.read_parquet(work / "knockout" / "knockout_mask.parquet")
    critical = knockout_sets_from_mask_table(table, config.mask.variant)
    settings = config.knockout
    common = dict(retain_scores=scores_from_table(table, "retain_score"),
                  forget_scores=scores_from_table(table, "selection_score"), random_draws=settings.random_draws,
                  curve_draws=settings.curve_draws, seed=settings.seed, batch_size=settings.batch_size)

    mean_answer_logprobs(model, items, pad, settings.batch_size)  # warm-up
    unit, _ = median_seconds(lambda: mean_answer_logprobs(model, items, pad, settings.batch_size), args.repeats)
    plain, result = median_seconds(lambda: knockout_check(model, forget, retain, pad, critical, **common), args.repeats)
    with_curve, curved = median_seconds(
        lambda: knockout_check(model, forget, retain, pad, critical, curve_sizes=settings.curve_sizes, **common),
        args.repeats)
    allowed = 1 + 3 * settings.random_draws  # the bound: 1 + (number of sets x draws)
    print(f"config: {args.config}; {len(forget)} forget + {len(retain)} retain items measured; torch threads "
          f"{args.threads}")
    print(f"knockout stage: {stage['knockout_wall_seconds']:.1f} s, of which its attribution on "
          f"{stage['knockout_attributed_forget_items']} + {stage['knockout_attributed_retain_items']} items "
          f"{stage['knockout_attribution_seconds']:.1f} s")
    print("\n".join(format_summary(result.summary)))
    print(f"one forward pass over the items: {unit:.3f} s (median of {args.repeats})")
    print(f"knockout without curve: {plain:.3f} s = {plain / unit:.2f} forward passes "
          f"({result.forward_passes} passes run; target <= {allowed})")
    print(f"knockout with curve {settings.curve_sizes} x (1 + {settings.curve_draws} draws): {with_curve:.3f} s = "
          f"{with_curve / unit:.2f} forward passes ({curved.forward_passes} passes run)")


if __name__ == "__main__":
    main()
