"""Entry point of each process of a sharded run of the unlearning or the fine-tuning stage:
``python -m simu_core.distributed_worker --stage unlearn|train`` under torchrun
(``simu_core.distributed.launch_stage`` launches it, or start it yourself on several machines).

Kept apart from :mod:`simu_core.distributed` because it imports :mod:`simu_core.stages`, which imports
that module: the code version of a stage that launches covers the launcher, not this entry point
(which imports every stage).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from simu_core import distributed, stages
from simu_core.config import load_config


def _init_process_group() -> None:
    """NCCL with one GPU per process when GPUs are here, else gloo on CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run this process's part of :func:`simu_core.stages.unlearn` (``--stage unlearn``, the default)
    or :func:`simu_core.stages.train_model` (``--stage train --which target|reference``) under torchrun.

    Arguments name the config (YAML or JSON, plus ``--set`` overrides) and the stage's folders, as
    the stage's function takes them; process 0 writes ``--out``.
    """
    parser = argparse.ArgumentParser(prog="python -m simu_core.distributed_worker",
                                     description="one process of a sharded (FSDP) unlearning or fine-tuning run, "
                                     "under torchrun")
    parser.add_argument("--stage", choices=("unlearn", "train"), default="unlearn",
                        help="unlearn the target (default), or fine-tune model.base (or the tiny model)")
    parser.add_argument("--which", choices=("target", "reference"), default=None,
                        help="--stage train: the target (full set) or the retain reference (retain split)")
    parser.add_argument("--config", required=True, help="config file (YAML or JSON)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", required=True, help="prepare_data's output folder")
    parser.add_argument("--target", default=None, help="--stage unlearn: the target model folder (or a hub id)")
    parser.add_argument("--mask", default=None, help="threshold_mask's output folder (masked methods)")
    parser.add_argument("--reference", default=None, help="frozen reference model (NPO, KL); default: the target")
    parser.add_argument("--reference-items", default=None,
                        help="the retain reference's items.parquet (unlearn.stop_at with a reference level)")
    parser.add_argument("--alternates", default=None, help="generate_alternates' output folder (altpo)")
    parser.add_argument("--out", required=True, help="output folder (written by process 0)")
    parser.add_argument("--error-file", default=None, help="where a failing process writes its error")
    args = parser.parse_args(argv)
    if args.stage == "unlearn" and args.target is None:
        parser.error("--stage unlearn needs --target")
    if args.stage == "train" and args.which is None:
        parser.error("--stage train needs --which target or --which reference")
    config = load_config(args.config, args.overrides)
    _init_process_group()
    try:
        if args.stage == "train":
            stages.train_model(config, Path(args.data), Path(args.out), args.which, progress=dist.get_rank() == 0)
        else:
            stages.unlearn(config, Path(args.data), Path(args.target), Path(args.mask) if args.mask else None,
                           Path(args.out), reference_dir=Path(args.reference) if args.reference else None,
                           progress=dist.get_rank() == 0,
                           reference_items_path=Path(args.reference_items) if args.reference_items else None,
                           alternates_dir=Path(args.alternates) if args.alternates else None)
        # Every process leaves together: a gloo process group torn down while a peer still
        # writes can abort in its worker threads ("terminate called without an active exception").
        dist.barrier()
    except BaseException as error:
        if args.error_file:
            Path(args.error_file).write_text(f"process {dist.get_rank()}: {type(error).__name__}: {error}\n")
        raise
    finally:
        distributed.reset_context()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalisation: gloo's C++ threads can still hold tensors then, and releasing
    # them without a live interpreter aborts the process (SIGABRT) after the work is done.
    os._exit(status)
