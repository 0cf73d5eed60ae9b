"""Per loss: SIMU's scope against all parameters (the same loss, Sophia both), from `simu report`'s tables.

Reads ``<results>/report/matched_stopped_forget_prob_best.csv`` (each curve's best lr: the lr whose readings
all matched with the highest mean model utility) and ``paired_differences.csv`` (curves paired on the same
target, seed and data at their best lrs) and prints one row per loss: each scope's readings and utilities,
and the paired difference simu_<loss> - so_<loss> with its spread, marked where it is larger than the spread
(|mean| > std) and than twice its standard error. Run `simu report --results DIR` first.

    .venv/bin/python scripts/scope_pairs.py --results results/losses/testbed
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from simu_core.method_names import ALL_METHODS, LOSSES, method_name


def scope_pairs(best: pd.DataFrame, pairs: pd.DataFrame, utilities: tuple[str, ...]) -> pd.DataFrame:
    """One row per loss with both curves present: each curve's best-lr figures and the paired differences."""
    rows = []
    for loss in LOSSES:
        if not {("sophia", "all"), ("sophia", "simu")} <= {(m.optimizer, m.scope) for m in ALL_METHODS.values()
                                                           if m.loss == loss}:
            continue
        full, scoped = method_name(loss, "sophia", "all"), method_name(loss, "sophia", "simu")
        if not best["curve"].isin([full, scoped]).any():
            continue  # this loss was not run
        row: dict[str, object] = {"loss": loss, "all": full, "simu": scoped}
        for name, curve in (("all", full), ("simu", scoped)):
            found = best[best["curve"] == curve]
            lr = found["lr"].iloc[0] if len(found) else None
            row[f"{name}_best_lr"] = float(lr) if lr is not None and pd.notna(lr) else None
            row[f"{name}_note"] = str(found["note"].iloc[0]) if len(found) and "note" in found and \
                pd.notna(found["note"].iloc[0]) else ""
            for utility in utilities:
                column = f"{utility}_mean"
                row[f"{name}_{utility}"] = float(found[column].iloc[0]) if len(found) and column in found else None
        pair = pairs[((pairs["curve_a"] == scoped) & (pairs["curve_b"] == full)) |
                     ((pairs["curve_a"] == full) & (pairs["curve_b"] == scoped))]
        if len(pair):
            sign = 1.0 if pair["curve_a"].iloc[0] == scoped else -1.0
            row["pairs"] = int(pair["pairs"].iloc[0])
            row["spread"] = str(pair["spread"].iloc[0]) if "spread" in pair else ""
            for utility in utilities:
                if f"{utility}_diff_mean" in pair:
                    row[f"diff_{utility}"] = sign * float(pair[f"{utility}_diff_mean"].iloc[0])
                    row[f"diff_{utility}_std"] = float(pair[f"{utility}_diff_std"].iloc[0])
                    row[f"diff_{utility}_beyond_std"] = bool(pair[f"{utility}_beyond_std"].iloc[0])
                    row[f"diff_{utility}_beyond_2se"] = bool(pair[f"{utility}_beyond_2se"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: object, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and pd.isna(value)) else f"{value:.{digits}f}"


def markdown(table: pd.DataFrame, utilities: tuple[str, ...]) -> str:
    header = ["loss", "all: best lr", "simu: best lr", "pairs over"]
    for utility in utilities:
        header += [f"{utility} all", f"{utility} simu", f"simu - all ({utility}, mean ± std, pairs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row["loss"])]
        for name in ("all", "simu"):
            lr = row[f"{name}_best_lr"]
            cells.append(f"{lr:g}" if lr is not None and pd.notna(lr) else "none (" + str(row[f"{name}_note"]).split(":")[0] + ")")
        spread = row.get("spread")
        cells.append(str(spread) if isinstance(spread, str) and spread else "-")
        for utility in utilities:
            cells += [_fmt(row.get(f"all_{utility}")), _fmt(row.get(f"simu_{utility}"))]
            if pd.notna(row.get(f"diff_{utility}")):
                marks = ("**" if row[f"diff_{utility}_beyond_2se"] else "")
                cells.append(f"{marks}{row[f'diff_{utility}']:+.3f}{marks} ± {row[f'diff_{utility}_std']:.3f} "
                             f"({int(row['pairs'])})" + (" > spread" if row[f"diff_{utility}_beyond_std"] else ""))
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bold: |mean| > 2 standard errors of the paired difference; '> spread': |mean| > its std."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path)
    parser.add_argument("--measure", default="forget_prob", help="the stop measure of the report's tables")
    args = parser.parse_args()
    report = args.results / "report"
    best = pd.read_csv(report / f"matched_stopped_{args.measure}_best.csv")
    pairs = pd.read_csv(report / "paired_differences.csv")
    utilities = ("model_utility", "retain_prob")
    print(markdown(scope_pairs(best, pairs, utilities), utilities))


if __name__ == "__main__":
    main()
