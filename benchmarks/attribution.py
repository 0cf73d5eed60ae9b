"""Attribution benchmark: reference (paper) mode vs fast mode on the built-in target's forget set.

    python benchmarks/attribution.py [--target DIR --data DIR] [--workdir DIR] [--steps M]
                                     [--batch-size B] [--max-items N] [--threads T] [--repeats R]

Without ``--target``/``--data`` it prepares the default built-in benchmark and trains its target
(``simu_core.config.load_config()`` + ``prepare_data`` / ``train_model``; about a minute on 2 cores)
into ``--workdir`` (reused when already there). Then, in one process, on the forget set:

- wall time of reference mode and of fast mode, and the speedup (the machine may be shared: fast
  mode and the fwd+bwd unit are timed ``--repeats`` times before and after the single reference
  run and medians are used; process CPU time is printed next to wall time);
- the Jaccard of their critical sets (layer-relative rule, forget scores) at t in {0.1, 0.2, 0.3, 0.5};
- the Spearman correlation of their scores (all neurons, and per layer);
- the cost of each mode relative to one forward+backward pass over the same items:
  time / (m x fwd+bwd time), fwd+bwd = a training-style pass (loss.backward() with parameter
  gradients) over the same items in batches of the same size, median of 3 after a warm-up.

Targets: fast >= 10x faster than reference with Jaccard >= 0.8 at t = 0.2; fast within 2x of
m forward+backward passes.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simu_core.attribution import attribute_neurons  # noqa: E402
from simu_core.config import load_config  # noqa: E402
from simu_core.finetune import encode_frame  # noqa: E402
from simu_core.models.adapter import ArchitectureAdapter  # noqa: E402
from simu_core.prompting import collate, pad_token_id  # noqa: E402
from simu_core.scoring import answer_loss  # noqa: E402
from simu_core.stages import MODEL_DIR, load_trained, prepare_data, read_benchmark, train_model  # noqa: E402
from simu_core.thresholding import jaccard, layer_relative_critical  # noqa: E402

THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
SPEEDUP_TARGET = 10.0
JACCARD_TARGET = 0.8  # at t = 0.2
COST_TARGET = 2.0  # fast time / (m x fwd+bwd time)


def timed(function):
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def fwd_bwd_sweep(model, examples, pad_id, batch_size: int):
    """A function running one training-style forward+backward sweep over ``examples``."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [collate([examples[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]

    def sweep() -> None:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            answer_loss(logits, batch["labels"]).backward()
        model.zero_grad(set_to_none=True)

    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, help="trained target folder (train_model output or HF folder)")
    parser.add_argument("--data", type=Path, help="prepare_data output folder")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "simu-bench-attribution")
    parser.add_argument("--steps", type=int, help="m (default: the config's attribution.steps)")
    parser.add_argument("--batch-size", type=int, help="default: the config's attribution.batch_size")
    parser.add_argument("--max-items", type=int, help="attribute on the first N forget items only")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared CPU, OpenMP threads waiting for each other at every op "
        "inflate small-op timings many times over; 0 keeps torch's default)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="fast / fwd+bwd timings before and after the reference")
    args = parser.parse_args(argv)
    if (args.target is None) != (args.data is None):
        parser.error("--target and --data go together")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    config = load_config()
    if args.target is None:
        data_dir, target_dir = args.workdir / "data", args.workdir / "target"
        if not (target_dir / MODEL_DIR).is_dir():
            print(f"training the built-in target into {args.workdir} ...", flush=True)
            started = time.perf_counter()
            prepare_data(config, data_dir)
            train_model(config, data_dir, target_dir, "target", progress=False)
            print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    else:
        data_dir, target_dir = args.data, args.target
    steps = args.steps or config.attribution.steps
    batch_size = args.batch_size or config.attribution.batch_size

    model, tokenizer = load_trained(target_dir, config)
    benchmark = read_benchmark(data_dir)
    forget = benchmark["forget"]
    if args.max_items:
        forget = forget.head(args.max_items)
    examples = encode_frame(tokenizer, forget, config.model.max_length)
    pad_id = pad_token_id(tokenizer)
    answer_tokens = sum(example.num_answer_tokens for example in examples)
    print(
        f"model: {type(model).__name__}, {ArchitectureAdapter(model).num_layers} layers; "
        f"forget items: {len(examples)}, answer tokens: {answer_tokens}; m = {steps}, batch size = {batch_size}; "
        f"torch threads: {torch.get_num_threads()}",
        flush=True,
    )

    # Warm-up both code paths on two items (allocator, kernels). The machine may be shared, so the
    # fast mode and the fwd+bwd unit are timed several times, interleaved with the (single, long)
    # reference run, and medians are used; wall and process CPU time are both reported.
    for mode in ("reference", "fast"):
        attribute_neurons(model, examples[:2], pad_id, mode=mode, steps=steps, batch_size=batch_size, progress=False)
    sweep = fwd_bwd_sweep(model, examples, pad_id, batch_size)
    sweep()

    def run(mode: str):
        return attribute_neurons(model, examples, pad_id, mode=mode, steps=steps, batch_size=batch_size, progress=False)

    units, fasts = [], []
    for _ in range(args.repeats):
        units.append(timed(sweep)[:2])
        fasts.append(timed(lambda: run("fast")))
    ref_wall, ref_cpu, reference = timed(lambda: run("reference"))
    for _ in range(args.repeats):
        units.append(timed(sweep)[:2])
        fasts.append(timed(lambda: run("fast")))
    fast = fasts[-1][2]
    unit_wall, unit_cpu = (statistics.median(u[i] for u in units) for i in (0, 1))
    fast_wall, fast_cpu = (statistics.median(f[i] for f in fasts) for i in (0, 1))
    print(f"  reference: {ref_wall:.2f} s; fast (median of {len(fasts)}): {fast_wall:.2f} s", flush=True)
    wall = {"reference": ref_wall, "fast": fast_wall}
    cpu = {"reference": ref_cpu, "fast": fast_cpu}

    speedup = wall["reference"] / wall["fast"]
    speedup_cpu = cpu["reference"] / cpu["fast"]
    cost = {mode: seconds / (steps * unit_wall) for mode, seconds in wall.items()}
    cost_cpu = {mode: seconds / (steps * unit_cpu) for mode, seconds in cpu.items()}
    overlaps = {
        t: jaccard(layer_relative_critical(reference, t), layer_relative_critical(fast, t)) for t in THRESHOLDS
    }
    sizes = {t: (layer_relative_critical(reference, t).total(), layer_relative_critical(fast, t).total()) for t in THRESHOLDS}
    rho_all = spearmanr(np.concatenate(reference.scores), np.concatenate(fast.scores)).statistic
    rho_layers = [spearmanr(r, f).statistic for r, f in zip(reference.scores, fast.scores)]

    print("\nattribution: reference (paper) mode vs fast mode")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  fast-mode isolation: {fast.metadata.get('isolation')}")
    print("                 wall s    CPU s   cost wall / CPU (x m fwd+bwd)")
    print(f"  fwd+bwd sweep {unit_wall:8.3f} {unit_cpu:8.3f}")
    for mode in ("reference", "fast"):
        print(f"  {mode:<12} {wall[mode]:8.2f} {cpu[mode]:8.2f}   {cost[mode]:7.2f} / {cost_cpu[mode]:.2f}")
    print(f"  speedup (reference / fast): {speedup:.1f}x wall, {speedup_cpu:.1f}x CPU")
    max_diff = max(float(np.abs(r - f).max() / max(np.abs(r).max(), 1e-30)) for r, f in zip(reference.scores, fast.scores))
    print(f"  max |fast - reference| / max |reference| over layers: {max_diff:.1e}")
    print("  Jaccard of critical sets (layer-relative rule; |C| reference / fast):")
    for t in THRESHOLDS:
        print(f"    t = {t:.1f}: {overlaps[t]:.3f}   ({sizes[t][0]} / {sizes[t][1]})")
    print(f"  Spearman of scores: all {rho_all:.4f}; per layer " + ", ".join(f"{rho:.4f}" for rho in rho_layers))

    checks = [
        (f"fast >= {SPEEDUP_TARGET:.0f}x faster than reference", speedup >= SPEEDUP_TARGET, f"{speedup:.1f}x"),
        (f"Jaccard >= {JACCARD_TARGET} at t = 0.2", overlaps[0.2] >= JACCARD_TARGET, f"{overlaps[0.2]:.3f}"),
        (f"fast within {COST_TARGET:.0f}x of m fwd+bwd", cost["fast"] <= COST_TARGET,
         f"{cost['fast']:.2f}x wall, {cost_cpu['fast']:.2f}x CPU"),
    ]
    print("\ntargets:")
    for name, ok, value in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
