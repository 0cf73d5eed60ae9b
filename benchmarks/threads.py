"""Thread settings on a shared CPU, and a 4-point sweep run 2 at a time against one after another.

Part ``options``: the step time of fine-tuning the default target (the tiny Llama: 4 layers, hidden
128, batch 16) in a fresh process per setting: torch threads 1 / all cores, OpenMP waiting actively
(libgomp's default spin) or passively (``OMP_WAIT_POLICY=PASSIVE``), alone and beside one other
torch process doing the same work with torch's defaults (what issue 11 measured at 5-8 s per step).

Part ``sweep``: ``simu_ablation`` over 4 values of ``unlearn.lr`` on a store whose shared stages
(data, target, reference, attribution) one run has already filled, so every point computes its
unlearning and its evaluation; each sweep in a fresh process, timed around the flow call: one point
after another (every core each), 2 in parallel sharing the cores (threads per point = cores / 2,
passive waiting: what ``simu ablate`` does) and 2 in parallel each on every core with torch's
default active waiting (the old behaviour).

Usage: ``python benchmarks/threads.py [--part options|sweep|all] [--seconds S] [--cores N]``.
Figures on a machine other processes also use are noisy: the script prints how many cores were
busy before each measurement.
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


def _sweep_child(args: argparse.Namespace) -> None:
    """One sweep (or the warm-up run) in this process; prints its wall time as JSON."""
    from flows.ablation import simu_ablation
    from flows.pipeline import simu_pipeline

    base = [f"run.store={args.root}/store", f"run.results={args.root}/results"]
    auto = args.threads < 0  # as `simu ablate` does: budget from the free cores, points share it
    started = time.perf_counter()
    if args.parallel == 0:
        simu_pipeline(overrides=base)
    else:
        grid = {"unlearn.lr": [f"{lr * args.lr_factor:.3g}" for lr in (3e-4, 2e-4, 1e-4, 5e-5)]}
        simu_ablation(grid=grid, overrides=base, max_parallel=args.parallel, threads=None if auto else args.threads,
                      first_threads=None if auto else args.first_threads)
    print(json.dumps({"seconds": time.perf_counter() - started, "budget": args.budget}))


def _run_child(root: str, parallel: int, threads: int, first: int, factor: float, policy: str | None) -> dict:
    env = _env(policy)
    env["PREFECT_HOME"] = os.path.join(root, "prefect")
    cmd = [sys.executable, __file__, "--sweep-child", "--root", root, "--parallel", str(parallel),
           "--threads", str(threads), "--first-threads", str(first), "--lr-factor", str(factor)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"sweep child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(cores: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        _run_child(root, 0, cores, cores, 1.0, "PASSIVE")  # fills the stages every point shares
        print(f"== sweep: 4 points (unlearn.lr) after the shared stages are cached (warm-up run "
              f"{time.perf_counter() - started:.0f} s); each mode in a fresh process, {cores} cores of budget")
        modes = [  # label, --max-parallel, threads per point (-1: simu's choice), first point's, OMP_WAIT_POLICY
            ("one after another", 1, cores, cores, "PASSIVE"),
            ("2 in parallel, cores shared", 2, max(1, cores // 2), cores, "PASSIVE"),
            ("simu ablate --max-parallel 1 (load-aware)", 1, -1, -1, None),
            ("simu ablate --max-parallel 2 (load-aware)", 2, -1, -1, None),
            ("2 in parallel, all cores each (old)", 2, cores, cores, None),
        ]
        results = {}
        for index, (label, parallel, threads, first, policy) in enumerate(modes):
            busy = busy_cores(0.5)
            figures = _run_child(root, parallel, threads, first, 1 + (index + 1) / 10, policy)
            results[label] = figures["seconds"]
            setting = (f"threads/point {threads} (first {first}), OMP_WAIT_POLICY {policy or 'unset'}" if threads > 0
                       else f"budget {figures['budget']} thread(s), passive waiting")
            print(f"{label:<42} {setting}: {results[label]:6.1f} s   (cores busy before: {busy:.2f})", flush=True)
        for label, baseline in (("2 in parallel, cores shared", "one after another"),
                                ("simu ablate --max-parallel 2 (load-aware)", "simu ablate --max-parallel 1 (load-aware)")):
            ratio = results[label] / results[baseline]
            print(f"{label} / {baseline}: {ratio:.2f} ({'no slower' if ratio <= 1.0 else 'SLOWER'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("options", "sweep", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per thread setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=None, help="thread budget of the sweep (default: all cores)")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--first-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lr-factor", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.seconds, args.forever)
        return
    if args.sweep_child:
        if args.threads < 0:
            from simu_core.threads import configure_threads

            args.budget = configure_threads(None)  # before torch is imported, as the CLI does
        else:
            import torch

            torch.set_num_threads(args.first_threads)
            args.budget = args.first_threads
        _sweep_child(args)
        return
    if args.part in ("options", "all"):
        options(args.seconds)
    if args.part in ("sweep", "all"):
        sweep(args.cores or available_cores())


if __name__ == "__main__":
    main()
