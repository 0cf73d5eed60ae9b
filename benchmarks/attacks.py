"""Cost of the attack suite on the built-in default: every attack on the three models a run attacks.

    python benchmarks/attacks.py [--config data/configs/default.yaml] [--workdir DIR] [--threads 2]
                                 [--set key=value ...]

Prepares the default benchmark, trains its target and retain reference and unlearns the target with the
default method (stopped at the reference's level) into ``--workdir`` (reused when there), then times, in
one process one after another, each attack's stage function (``simu_core.stages.attack_*`` and
``relearn``: loading the model, the attack, writing its tables) on the unlearned model, the target and
the retain reference, with every attack of ``simu_core.attacks.names.ATTACKS`` at its default settings.
In a sweep the target's and the reference's attacks are cached and shared by every method, so a run pays
for the unlearned model's only; the total below counts all three models.

Target (issue 18): the whole suite on the built-in default under 60 s on 2 threads.
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
from simu_core.attacks.names import ATTACKS, attack_stage  # noqa: E402
from simu_core.config import load_config  # noqa: E402


def models(config, workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The data folder and the unlearned model, target and retain reference under ``workdir``
    (``benchmarks/stop_checks.py``'s preparation, then the default method's unlearning)."""
    from stop_checks import prepared

    folders = prepared(config, workdir)
    unlearned = workdir / "unlearned"
    if not (unlearned / "model").is_dir():
        stages.unlearn(config, folders["data"], folders["target"], folders["mask"], unlearned, progress=False,
                       reference_items_path=folders["reference_eval"] / "items.parquet")
    return folders["data"], {"unlearned": unlearned, "target": folders["target"], "reference": folders["reference"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--workdir", default=None, help="folder for the prepared models (reused when there)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, [f"attacks=[{','.join(ATTACKS)}]", *args.overrides])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="simu-attacks-bench-"))
    data, folders = models(config, workdir)
    print(f"torch threads: {torch.get_num_threads()}; models in {workdir}")
    print(f"{'attack':<12} {'unlearned s':>12} {'target s':>10} {'reference s':>12} {'all three s':>12}")
    total = 0.0
    for attack in ATTACKS:
        function = getattr(stages, attack_stage(attack))
        seconds = {}
        for name, model_dir in folders.items():
            started = time.perf_counter()
            function(config, data, model_dir, workdir / "attacks" / attack / name, progress=False)
            seconds[name] = time.perf_counter() - started
        total += sum(seconds.values())
        print(f"{attack:<12} {seconds['unlearned']:>12.2f} {seconds['target']:>10.2f} {seconds['reference']:>12.2f} "
              f"{sum(seconds.values()):>12.2f}")
    verdict = "within" if total < 60 else "OVER"
    print(f"whole suite, three models: {total:.1f} s ({verdict} the 60 s target on {args.threads} threads)")


if __name__ == "__main__":
    main()
