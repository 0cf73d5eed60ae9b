"""Thread settings on a shared CPU, and a 4-point sweep run 2 at a time against one after another.

Part ``options``: the step time of fine-tuning the default target (the tiny Llama: 4 layers, hidden
128, batch 16) in a fresh process per setting: torch threads 1 / all cores, OpenMP waiting actively
(libgomp's default spin) or passively (``OMP_WAIT_POLICY=PASSIVE``), alone and beside one other
torch process doing the same work with torch's defaults (what issue 11 measured at 5-8 s per step).

Part ``sweep``: ``simu_ablation`` over 4 values of ``unlearn.lr`` on a store whose shared stages
(data, target, reference, attribution) one run has already filled, so every point computes its
unlearning and evaluation: once with ``--max-parallel 1`` (each point gets the free cores), once with
2 in parallel sharing the cores (threads per point = free cores / 2, as ``simu ablate`` picks), and
once with 2 in parallel each using every core (the old behaviour).

Usage: ``python benchmarks/threads.py [--part options|sweep|all] [--seconds S]``. Figures on a
machine other processes also use are noisy: the script prints how many cores were busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simu_core.threads import available_cores, busy_cores  # noqa: E402


def worker(threads: int, seconds: float, forever: bool) -> None:
    """Fine-tuning steps of the default target shape; prints the median step time as JSON."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from simu_core.optim import MasterAdamW
    from simu_core.scoring import answer_loss

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256))
    optimizer = MasterAdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 1024, (16, 48))
    labels = ids.clone()
    labels[:, :24] = -100
    times: list[float] = []
    started = time.perf_counter()
    while forever or (time.perf_counter() - started < seconds and len(times) < 200) or len(times) < 4:
        step_start = time.perf_counter()
        loss = answer_loss(model(input_ids=ids).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - step_start)
    steady = times[2:]  # the first steps allocate
    print(json.dumps({"threads": torch.get_num_threads(), "steps": len(steady),
                      "median_s": statistics.median(steady), "mean_s": statistics.fmean(steady)}))


def _worker_cmd(threads: int, seconds: float, forever: bool = False) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--seconds", str(seconds)]
    return cmd + (["--forever"] if forever else [])


def _env(policy: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def options(seconds: float) -> None:
    cores = available_cores()
    print(f"== thread options: fine-tuning step of the default target, {cores} cores, "
          f"median over ~{seconds:.0f} s per setting")
    print(f"{'load':<26} {'threads':>7} {'OMP_WAIT_POLICY':>15} {'s/step':>8} {'steps':>5} {'busy before':>11}")
    for load in ("alone", "beside 1 torch process"):
        for threads in (1, cores):
            for policy in (None, "PASSIVE"):
                competitor = None
                if load != "alone":  # torch's defaults: every core, active waiting
                    competitor = subprocess.Popen(_worker_cmd(0, 0, forever=True), env=_env(None),
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(3.0)  # let it reach its steady state
                busy = busy_cores(0.5)
                try:
                    out = subprocess.run(_worker_cmd(threads, seconds), env=_env(policy), capture_output=True,
                                         text=True, check=True, timeout=seconds * 20 + 120).stdout
                finally:
                    if competitor is not None:
                        competitor.terminate()
                        competitor.wait()
                figures = json.loads(out.strip().splitlines()[-1])
                print(f"{load:<26} {threads:>7} {policy or 'unset (active)':>15} {figures['median_s']:>8.3f} "
                      f"{figures['steps']:>5} {busy:>11.2f}", flush=True)


def sweep(values: list[float]) -> None:
    with tempfile.TemporaryDirectory() as root:
        os.environ.setdefault("PREFECT_HOME", os.path.join(root, "prefect"))
        from flows.ablation import simu_ablation
        from flows.pipeline import simu_pipeline
        from simu_core.threads import threads_for

        base = [f"run.store={root}/store", f"run.results={root}/results"]
        started = time.perf_counter()
        simu_pipeline(overrides=base)  # fills the stages every point shares
        print(f"== sweep: 4 points (unlearn.lr), shared stages cached (warm-up run {time.perf_counter() - started:.0f} s)")
        cores = available_cores()
        free_one, free_two = threads_for(1), threads_for(2)
        modes = [
            ("one after another", 1, free_one, free_one),
            ("2 in parallel, cores shared", 2, free_one, free_two),
            ("2 in parallel, all cores each (old)", 2, cores, cores),
        ]
        results = {}
        for index, (label, parallel, first, per_point) in enumerate(modes):
            grid = {"unlearn.lr": [f"{value * (1 + index / 10):.3g}" for value in values]}  # new points each mode
            busy = busy_cores(0.5)
            started = time.perf_counter()
            simu_ablation(grid=grid, overrides=base, max_parallel=parallel, threads=per_point, first_threads=first)
            results[label] = time.perf_counter() - started
            print(f"{label:<38} threads per point {per_point} (first point {first}): {results[label]:6.1f} s  "
                  f"(busy cores before: {busy:.2f})", flush=True)
        ratio = results["2 in parallel, cores shared"] / results["one after another"]
        print(f"2 in parallel / one after another: {ratio:.2f} ({'no slower' if ratio <= 1.0 else 'SLOWER'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("options", "sweep", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per thread setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.seconds, args.forever)
        return
    if args.part in ("options", "all"):
        options(args.seconds)
    if args.part in ("sweep", "all"):
        sweep([3e-4, 2e-4, 1e-4, 5e-5])


if __name__ == "__main__":
    main()
