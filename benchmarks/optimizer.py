"""Optimizer benchmark: MaskedSophia step time vs AdamW, and SIMU's optimizer-state size.

    python benchmarks/optimizer.py [--device cpu|cuda] [--dtype fp32|bf16] [--steps N]

(1) Time per ``step()`` on small randomly initialised Llamas with fixed random gradients, median of
N interleaved steps after warm-up: MaskedSophia with SIMU's mask (attention projections full + 5% of
down-projection columns via ColumnMask, everything else frozen with requires_grad=False), MaskedSophia
unmasked, and torch.optim.AdamW(foreach=True), both over all parameters.
(2) Optimizer-state bytes of SIMU vs SO-GradDiff (Sophia on all parameters) for a LLaMA2-7B-shaped
model built on the meta device (shapes only, nothing allocated).
Targets: masked step <= 1.3x AdamW; SIMU state <= 40% of SO-GradDiff.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from optimizer_state import (  # noqa: E402
    adamw_state_bytes,
    describe_simu_set,
    simu_masks,
    sophia_state_bytes,
)
from simu_core.optim import MaskedSophia  # noqa: E402

STEP_TARGET = 1.3  # masked step time / AdamW step time
STATE_TARGET = 0.40  # SIMU state / SO-GradDiff state
CRITICAL_FRACTION = 0.05
HP = dict(lr=1e-5, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1)  # SOUL's TOFU settings


def llama(layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
    )


def fixed_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_steps(config: LlamaConfig, device: str, dtype: torch.dtype, steps: int, warmup: int) -> dict[str, float]:
    """Median step time (ms) of each optimizer; steps are interleaved so drift hits all alike."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)

    simu_model = copy.deepcopy(base)
    specs = simu_masks(simu_model, CRITICAL_FRACTION, torch.Generator().manual_seed(0))
    named = dict(simu_model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in specs)  # what SIMU's trainer does: frozen params get no grad at all
    simu = MaskedSophia(simu_model.parameters(), **HP, masks={named[n]: s for n, s in specs.items()})

    full_model, adamw_model = copy.deepcopy(base), copy.deepcopy(base)
    runs = {
        "MaskedSophia (SIMU mask)": (simu, simu_model),
        "MaskedSophia (unmasked)": (MaskedSophia(full_model.parameters(), **HP), full_model),
        "AdamW foreach (all)": (torch.optim.AdamW(adamw_model.parameters(), lr=1e-5, weight_decay=0.1,
                                                  foreach=True), adamw_model),
    }
    for opt, model in runs.values():
        fixed_grads(model, seed=1)
        if isinstance(opt, MaskedSophia):
            opt.update_hessian()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (opt, _) in runs.items():
            t = timed(opt.step, device)
            if i >= warmup:
                times[name].append(t)

    # Consistency: the shape-based state size is what the optimizer really allocated.
    assert simu.state_bytes() == sophia_state_bytes(simu_model.named_parameters(), specs)
    hess = [timed(simu.update_hessian, device) for _ in range(10)]
    result = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    result["update_hessian (SIMU mask)"] = 1e3 * statistics.median(hess)
    result["win rate (SIMU mask, last step)"] = simu.last_win_rate
    result["_describe"] = describe_simu_set(simu_model, specs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, 1 thread gives steadier ratios
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, device {args.device}, param dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, median of {args.steps} steps after {args.warmup} warm-up")

    models = {
        "small Llama (4 layers, hidden 128, intermediate 512, vocab 512)": llama(4, 128, 512, 512, 4),
        "larger Llama (8 layers, hidden 512, intermediate 1376, vocab 512)": llama(8, 512, 1376, 512, 8),
    }
    worst = 0.0
    for title, config in models.items():
        r = bench_steps(config, args.device, dtype, args.steps, args.warmup)
        print(f"\n== {title}")
        for line in r.pop("_describe"):
            print(f"  SIMU set: {line}")
        adamw = r["AdamW foreach (all)"]
        for name, value in r.items():
            if name.startswith("win rate"):
                print(f"  {name:34s} {value:.3f}")
            else:
                print(f"  {name:34s} {value:8.3f} ms   ({value / adamw:.2f}x AdamW)")
        ratio = r["MaskedSophia (SIMU mask)"] / adamw
        worst = max(worst, ratio)
        print(f"  masked step / AdamW = {ratio:.2f}x (target <= {STEP_TARGET}x): "
              f"{'OK' if ratio <= STEP_TARGET else 'MISSED'}")

    print("\n== optimizer state, LLaMA2-7B shapes (meta device, nothing allocated)")
    config = llama(32, 4096, 11008, 32000, 32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = simu_masks(model, CRITICAL_FRACTION, torch.Generator().manual_seed(0))
    for line in describe_simu_set(model, specs):
        print(f"  SIMU set: {line}")
    for label, p_dtype in (("fp32 params", torch.float32), ("bf16 params + fp32 master", torch.bfloat16)):
        model.to(p_dtype)
        simu = sophia_state_bytes(model.named_parameters(), specs)
        so = sophia_state_bytes(model.named_parameters(), None)
        fo = adamw_state_bytes(model.named_parameters())
        print(f"  [{label}] SIMU {simu / 2**30:.2f} GiB | SO-GradDiff {so / 2**30:.2f} GiB | "
              f"FO-GradDiff AdamW {fo / 2**30:.2f} GiB | SIMU / SO-GradDiff = {simu / so:.1%} "
              f"(target <= {STATE_TARGET:.0%}): {'OK' if simu / so <= STATE_TARGET else 'MISSED'}")
    print(f"\nworst masked step / AdamW = {worst:.2f}x (target <= {STEP_TARGET}x)")


if __name__ == "__main__":
    main()
