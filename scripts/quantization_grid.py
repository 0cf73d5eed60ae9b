"""Why quantization does (not) undo unlearning: how far unlearning moved each linear weight, in steps of
the quantization grid, and how many moved weights land back on the target's grid point.

    .venv/bin/python scripts/quantization_grid.py --target DIR --unlearned DIR [--config CONFIG]
                                                  [--bits 8 4] [--group-size 128] [--scheme asymmetric]

DIR: a model folder as the stages write it (``<stage output>/model``'s parent, e.g. the ``target`` and
``unlearned`` folders of ``benchmarks/attacks.py --workdir``). Per bit width: the share of linear weights
(embeddings excluded) unlearning moved, the share of those whose quantized value equals the target's
quantized value (quantization undoes the move there), and the moved distance |w_unlearned - w_target| in
units of the group's grid step ((max - min) / (2^bits - 1) of the target's group), median and 90th
percentile. Zhang et al. (ICLR 2025): unlearning with a small lr moves weights by less than a 4-bit step, so
the quantized unlearned model is the quantized target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simu_core.attacks.quantize import quantize_weights  # noqa: E402
from simu_core.config import load_config  # noqa: E402
from simu_core.stages import load_trained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--unlearned", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--scheme", default="asymmetric")
    args = parser.parse_args()
    config = load_config(args.config)
    target, _ = load_trained(Path(args.target), config)
    unlearned, _ = load_trained(Path(args.unlearned), config)
    for bits in args.bits:
        quantized_target = dict(quantize_weights(target, bits, args.group_size, args.scheme).named_parameters())
        quantized_unlearned = dict(quantize_weights(unlearned, bits, args.group_size, args.scheme).named_parameters())
        moved_count = back = total = 0
        distances = []
        for (name, before), after in zip(target.named_parameters(), unlearned.parameters()):
            if before.dim() != 2 or "embed" in name:
                continue
            moved = before != after
            moved_count += int(moved.sum())
            total += before.numel()
            back += int(((quantized_target[name] == quantized_unlearned[name]) & moved).sum())
            groups = before.detach().reshape(before.shape[0], -1, args.group_size)
            step = (groups.amax(-1) - groups.amin(-1)) / (2 ** bits - 1)
            distance = (after - before).detach().abs().reshape_as(groups) / step.unsqueeze(-1)
            distances.append(distance[moved.reshape_as(groups)])
        ratio = torch.cat(distances)
        print(f"{bits}-bit, groups of {args.group_size}, {args.scheme}: unlearning moved {moved_count} of {total} linear "
              f"weights ({moved_count / total:.1%}); quantized onto the target's grid point: {back / max(moved_count, 1):.1%} "
              f"of them; |moved| / grid step: median {ratio.median():.3f}, 90th percentile {ratio.quantile(0.9):.3f}")


if __name__ == "__main__":
    main()
