"""Cost of stopping at a forgetting level: the checks' share of the unlearning stage's time.

    python benchmarks/stop_checks.py [--config data/configs/mlp_localised.yaml] [--workdir DIR]
                                     [--threads T] [--methods fo_graddiff:1.2e-4,so_graddiff:5e-5,simu:1.2e-4]
                                     [--stop-at forget_prob<=reference] [--set key=value ...]

Prepares the config's benchmark and trains its target and retain reference into ``--workdir``
(reused when there), evaluates the reference lightly (the level), computes SIMU's mask, then, per
method at its lr (by default each method's best lr of the testbed sweep, with its 200-step budget),
in one process one after another:

- the unlearning stage with ``unlearn.stop_at`` (the config's ``unlearn.eval_every``, default 10):
  the stage's wall time, the checks' seconds (``stop_check_seconds``: every check's measurement),
  their share, the number of checks and steps, and where it stopped;
- the same stage without ``stop_at`` (the whole budget), for scale.

Target (issue 16): the checks cost at most 25 % of the unlearning stage's time with the default
``eval_every`` on the testbed preset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simu_core import stages  # noqa: E402
from simu_core.config import load_config  # noqa: E402
from simu_core.stopping import format_outcome  # noqa: E402


def prepared(config, workdir: Path) -> dict[str, Path]:
    """Data, target, retain reference, its light evaluation and SIMU's mask under ``workdir``."""
    folders = {name: workdir / name for name in ("data", "target", "reference", "reference_eval", "forget_scores",
                                                 "retain_scores", "mask")}
    if not (folders["data"] / "sizes.json").is_file():
        stages.prepare_data(config, folders["data"])
    for which in ("target", "reference"):
        if not (folders[which] / "model").is_dir():
            stages.train_model(config, folders["data"], folders[which], which, progress=False)
    if not (folders["reference_eval"] / "items.parquet").is_file():
        stages.evaluate(config, folders["data"], folders["reference"], folders["reference_eval"], light=True)
    for which in ("forget", "retain"):
        if not (folders[f"{which}_scores"] / stages.SCORES_FILE).is_file():
            stages.attribute(config, folders["data"], folders["target"], folders[f"{which}_scores"], which)
    if not (folders["mask"] / stages.MASK_FILE).is_file():
        stages.threshold_mask(config, folders["forget_scores"], folders["retain_scores"], folders["mask"])
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "data" / "configs" / "mlp_localised.yaml"))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "simu-bench-stop"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="fo_graddiff:1.2e-4,so_graddiff:5e-5,simu:1.2e-4",
                        help="method:lr pairs (default: each method's best lr of the testbed sweep, docs/results.md)")
    parser.add_argument("--stop-at", default="forget_prob<=reference")
    parser.add_argument("--set", action="append", default=["unlearn.epochs=20"], dest="overrides",
                        help="config overrides (default: unlearn.epochs=20, the testbed sweep's budget)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.config, [*args.overrides, "knockout.enabled=false"])
    workdir = Path(args.workdir)
    folders = prepared(base, workdir)
    print(f"torch threads: {torch.get_num_threads()}; config {args.config} {' '.join(args.overrides)}; "
          f"eval_every {base.unlearn.eval_every}, stop_retain_items {base.unlearn.stop_retain_items}")
    print(f"{'method':<12} {'stage s':>8} {'checks s':>9} {'share':>6} {'checks':>6} {'steps':>11} "
          f"{'no-stop stage s':>15}  outcome")
    for entry in args.methods.split(","):
        method, _, lr = entry.partition(":")
        chosen = [*args.overrides, "knockout.enabled=false", f"unlearn.method={method}", *([f"unlearn.lr={lr}"] if lr else [])]
        stopped = load_config(args.config, [*chosen, f"unlearn.stop_at={args.stop_at}"])
        plain = load_config(args.config, [*chosen, "unlearn.stop_at=null"])
        mask = folders["mask"] if method in ("simu", "simu_npo") else None
        out = workdir / f"unlearn-{method}"
        started = time.perf_counter()
        summary = stages.unlearn(stopped, folders["data"], folders["target"], mask, out / "stopped", progress=False,
                                 reference_items_path=folders["reference_eval"] / "items.parquet")
        stage_seconds = time.perf_counter() - started
        started = time.perf_counter()
        stages.unlearn(plain, folders["data"], folders["target"], mask, out / "plain", progress=False)
        plain_seconds = time.perf_counter() - started
        checks = summary["stop_check_seconds"]
        print(f"{method:<12} {stage_seconds:>8.2f} {checks:>9.2f} {checks / stage_seconds:>6.1%} "
              f"{summary['stop_checks']:>6} {summary['steps']:>5} of {summary['stop_budget_steps']:<3} "
              f"{plain_seconds:>15.2f}  {summary['stop_status']}")
        print(f"{'':<12} {format_outcome(summary)}")


if __name__ == "__main__":
    main()
