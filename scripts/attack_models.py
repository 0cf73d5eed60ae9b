"""What each attack does to the unlearned models, their targets and their retain references: the mean over
a curve's runs of each model's measure before and after the attack (``robustness.parquet`` of each run).

    .venv/bin/python scripts/attack_models.py --results results/attacks/testbed --set unlearn.method=simu \\
        [--set mask.rule=layer_relative ...] [--measure forget_prob]

``--set`` picks the runs (config columns of ``runs.parquet``, completed runs only); the per-layer rows of the
logit lens are left out (its ``max`` setting and the ``forget_best_layer`` measure stay).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

COLUMNS = ["unlearned_before", "unlearned_after", "target_before", "target_after", "reference_before",
           "reference_after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--set", dest="filters", action="append", default=[])
    parser.add_argument("--measure", default="forget_prob")
    args = parser.parse_args()
    runs = pd.read_parquet(Path(args.results) / "runs.parquet")
    runs = runs[runs["status"] == "completed"]
    for assignment in args.filters:
        key, value = assignment.split("=", 1)
        runs = runs[runs[f"config.{key}"] == yaml.safe_load(value)]
    tables = [pd.read_parquet(Path(args.results) / "runs" / run_id / "robustness.parquet") for run_id in runs["run_id"]
              if (Path(args.results) / "runs" / run_id / "robustness.parquet").exists()]
    if not tables:
        raise SystemExit(f"no attacked run in {args.results} matches {args.filters}")
    table = pd.concat(tables, ignore_index=True)
    table = table[table["measure"].isin([args.measure, args.measure.replace("_prob", "_best_layer")])
                  & ~table["setting"].str.startswith("layer=")]
    print(f"{len(tables)} runs; mean over them:")
    print(table.groupby(["attack", "setting", "measure"], sort=False)[COLUMNS].mean().round(3).to_string())


if __name__ == "__main__":
    main()
