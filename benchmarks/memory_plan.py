"""``simu plan``'s estimates against measured peaks, on CPU with small models.

    python benchmarks/memory_plan.py [--steps 3] [--skip-fsdp]

For each setting (method, dtype, checkpointing) a small Llama is unlearned for a few steps with
sequences of exactly the planned length, and three figures are printed:

- the plan's estimate of the step's peak (``simu_core.planning.simulate_step``, fake tensors);
- the measured peak of live tensor bytes (``simu_core.memtrack.TensorMemoryTracker`` around the real
  trainer: the CPU counterpart of ``torch.cuda.max_memory_allocated``);
- the peak RSS growth of the process during the run (``VmHWM`` minus ``VmRSS`` before it), a rough
  cross-check: glibc keeps freed pages and the allocator rounds, so it reads higher.

Then the same for unlearning and for fine-tuning sharded over 2 gloo processes (FSDP2), per process,
against the plan's 2-device rows. Target: estimate within 20 % of the measured tensor peak (GPU: 15 %, not measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MB = 2**20
TARGET = 0.20
SHAPE = ["model.tiny.num_layers=4", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=1024",
         "model.tiny.vocab_size=2048", "model.max_length=128", "unlearn.batch_size=8", "unlearn.lr=1e-4"]
SEQ = 128
SETTINGS = {
    "simu fp32": ["unlearn.method=simu"],
    "so_graddiff fp32": ["unlearn.method=so_graddiff"],
    "fo_graddiff fp32": ["unlearn.method=fo_graddiff"],
    "npo fp32": ["unlearn.method=npo"],
    "simu bf16 + ckpt": ["unlearn.method=simu", "model.dtype=bfloat16", "unlearn.gradient_checkpointing=true"],
    "so_graddiff bf16 + ckpt": ["unlearn.method=so_graddiff", "model.dtype=bfloat16",
                                "unlearn.gradient_checkpointing=true"],
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def examples(count: int, seed: int, vocab: int):
    from simu_core.planning import full_length_examples

    return full_length_examples(count, SEQ, vocab, seed)


def measure(overrides: list[str], steps: int, distributed=None) -> dict:
    """Run the trainer for ``steps`` steps; return the measured tensor peak and RSS growth (bytes)."""
    from transformers import LlamaForCausalLM

    from simu_core import planning
    from simu_core.config import load_config
    from simu_core.memtrack import TensorMemoryTracker
    from simu_core.unlearning import build_trainer

    config = load_config(overrides=SHAPE + overrides)
    shape = planning.architecture_config(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(getattr(torch, config.model.dtype))
    mask = planning.mask_for_plan([shape.intermediate_size] * shape.num_hidden_layers, 0.05) \
        if config.unlearn.method == "simu" else None
    tracker = TensorMemoryTracker()
    tracker.register([*model.parameters(), *model.buffers()])
    rss_before = _status_kb("VmRSS") * 1024
    trainer = build_trainer(
        model, examples(32, 1, shape.vocab_size), examples(32, 2, shape.vocab_size),
        config.unlearn.model_copy(update={"max_steps": steps}), pad_token_id=0, mask=mask, progress=False,
        distributed=distributed,
    )
    if distributed is not None:  # sharding replaced the parameters: count the local shards instead
        tracker = TensorMemoryTracker()
        tracker.register([p.to_local() for p in model.parameters()] + list(model.buffers()))
    if trainer.reference is not None:
        tracker.register([*trainer.reference.parameters(), *trainer.reference.buffers()])
    with tracker:
        trainer.train()
    return {"tensor_peak": tracker.peak, "rss_growth": _status_kb("VmHWM") * 1024 - rss_before}


#: Fine-tuning settings (every weight trained with MasterAdamW), measured sharded.
FINETUNE_SETTINGS = {
    "fine-tune fp32": [],
    "fine-tune bf16 + ckpt": ["model.dtype=bfloat16", "model.finetune.gradient_checkpointing=true"],
}
FINETUNE_SHAPE = ["model.finetune.batch_size=8", "model.finetune.epochs=1"]


def measure_finetune(overrides: list[str], distributed) -> int:
    """Fine-tune sharded for one epoch (32 items, 4 steps); this process's measured tensor peak (bytes)."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from simu_core import planning
    from simu_core.config import load_config
    from simu_core.distributed import shard_model
    from simu_core.finetune import finetune
    from simu_core.memtrack import TensorMemoryTracker

    config = load_config(overrides=SHAPE + FINETUNE_SHAPE + overrides)
    shape = planning.architecture_config(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(getattr(torch, config.model.dtype))
    shard_model(model, distributed)  # before counting: the tracker sees this process's shards
    tracker = TensorMemoryTracker()
    tracker.register([p.to_local() for p in model.parameters()] + list(model.buffers()))
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # finetune reads only the pad id
    with tracker:
        finetune(model, tokenizer, examples(32, 1, shape.vocab_size), config.model.finetune, progress=False,
                 distributed=distributed)
    return tracker.peak


def estimate(overrides: list[str], devices: int = 1, stage: str = "unlearn") -> int:
    from simu_core import planning
    from simu_core.config import load_config

    extra = FINETUNE_SHAPE if stage == "train" else []
    config = load_config(overrides=SHAPE + extra + overrides)
    plan = planning.plan_memory(config, device_counts=(devices,), stages=(stage,), seq_len=SEQ)
    return next(row.peak for row in plan.rows(stage) if row.devices == devices)


def fsdp_worker(steps: int, out: str) -> None:
    """One of the 2 gloo processes: measure this process's peak while unlearning sharded."""
    import torch.distributed as dist

    from simu_core.distributed import current_context

    dist.init_process_group("gloo")
    try:
        results = {name: measure(overrides, steps, current_context())["tensor_peak"]
                   for name, overrides in SETTINGS.items() if "npo" not in name}
        results.update({name: measure_finetune(overrides, current_context())
                        for name, overrides in FINETUNE_SETTINGS.items()})
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fsdp_worker:
        fsdp_worker(args.steps, args.fsdp_worker)
        return
    print(f"model: Llama 4 x 256 (d_ff 1024, vocab 2048), batch 8 x {SEQ} tokens, {args.steps} steps, 1 thread")
    print(f"{'setting':26s} {'plan MiB':>9s} {'measured MiB':>13s} {'plan/measured':>14s} {'RSS growth MiB':>15s}")
    worst = 0.0
    for name, overrides in SETTINGS.items():
        # Each measurement in a fresh process, so that RSS growth is this run's.
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['x']; "
                f"import benchmarks.memory_plan as m; import torch; torch.set_num_threads(1); "
                f"print(json.dumps(m.measure({overrides!r}, {args.steps})))")
        result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.strip().splitlines()[-1])
        planned = estimate(overrides)
        ratio = planned / result["tensor_peak"]
        worst = max(worst, abs(ratio - 1))
        print(f"{name:26s} {planned / MB:9.1f} {result['tensor_peak'] / MB:13.1f} {ratio:14.3f} "
              f"{result['rss_growth'] / MB:15.1f}")
    print(f"largest deviation: {worst:.1%} (target {TARGET:.0%})")
    if args.skip_fsdp:
        return
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "fsdp.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        __file__, "--steps", str(args.steps), "--fsdp-worker", str(out)], check=True, env=env,
                       capture_output=True)
        measured = json.loads(out.read_text())
    print("\nFSDP over 2 gloo processes (process 0):")
    print(f"{'setting':26s} {'plan MiB':>9s} {'measured MiB':>13s} {'plan/measured':>14s}")
    for name, peak in measured.items():
        if name in FINETUNE_SETTINGS:
            planned = estimate(FINETUNE_SETTINGS[name], devices=2, stage="train")
        else:
            planned = estimate(SETTINGS[name], devices=2)
        print(f"{name:26s} {planned / MB:9.1f} {peak / MB:13.1f} {planned / peak:14.3f}")


if __name__ == "__main__":
    main()
