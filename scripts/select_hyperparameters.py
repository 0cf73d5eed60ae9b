"""Pick, per method, the setting that maximises a criterion fixed in advance, from a tuning sweep.

Criterion (docs/results.md): the highest forget quality (KS p-value against the retain reference)
on the tuning seed; ties broken by the higher model utility. The reporting seeds are never looked
at. Prints one line per method: ``<method> <key>=<value> ...``.

Usage: ``python scripts/select_hyperparameters.py RESULTS_DIR --key config.unlearn.lr``
"""

from __future__ import annotations

import argparse

from simu_core.reporting import read_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results")
    parser.add_argument("--key", action="append", default=[], help="tuned config column(s), e.g. config.unlearn.lr")
    args = parser.parse_args()
    runs = read_runs(args.results)
    keys = args.key or ["config.unlearn.lr"]
    for method, rows in runs.groupby("config.unlearn.method"):
        best = rows.sort_values(["forget_quality", "model_utility"], ascending=False).iloc[0]
        chosen = " ".join(f"{key.removeprefix('config.')}={best[key]}" for key in keys)
        print(f"{method} {chosen}  (forget_quality={best['forget_quality']:.3g}, model_utility={best['model_utility']:.3f})")


if __name__ == "__main__":
    main()
