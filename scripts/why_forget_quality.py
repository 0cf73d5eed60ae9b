"""Why do methods at the same forget probability reach different forget quality (FQ)?

FQ is the KS-test p-value (``scipy.stats.ks_2samp``) between the unlearned model's forget-item
truth ratios and the retain reference's. Per forget item the truth ratio is
``R = exp(nll_paraphrased - mean_j nll_perturbed_j)`` (``simu_core.metrics.tofu.truth_ratio``:
the geometric mean over perturbed answers of P(perturbed)^(1/len) over P(paraphrased)^(1/len)), so
with per-token log-probs ``logp = -nll``::

    log R = logp_perturbed - logp_paraphrased     (logp_perturbed: mean over the options)

and a change of log R is the change of the perturbed answers' log-prob minus the paraphrased
answer's. This script reads each reading's ``items.parquet`` (forget split; models unlearned,
target, reference) and reports, per curve (method + mask settings), mean ± std over readings of:

* where the reading stands: forget probability, FQ, the KS statistic D, the forget truth-ratio
  score mean(min(R, 1/R)), median and IQR of log R (unlearned; the reference's in its own row) and
  the share of items whose R is above the reference's median R;
* which answers lose probability: the mean per-token log-prob change, vs the target, of the
  original answer, the paraphrased answer and the perturbed answers (unlearned - target; the
  retain reference's row: reference - target), and of log R;
* per item: the Spearman correlation over items between the answer's log-prob change and the
  perturbed answers' (does a method lower everything about the author, or only the memorised
  answer?), the same with the paraphrased answer, the ratio mean(Δ perturbed) / mean(Δ answer),
  and the share of items whose log R rose.

Usage::

    python scripts/why_forget_quality.py --results results/matched/testbed/forget_prob__reference
    python scripts/why_forget_quality.py --results results/probe --all --out /tmp/why

By default only readings with ``stop.status == matched`` count (``--matched-only``); ``--all``
takes every completed run. Writes ``why_forget_quality.csv`` (one row per curve, plus the target
and the retain reference) and ``why_forget_quality_items.csv`` (one row per reading and forget item) into
``--out`` (default ``<results>/report``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from simu_core.matched import curve_columns, curve_label, data_key, target_seeds
from simu_core.reporting import read_runs, setting_columns

MODELS = ("unlearned", "target", "reference")
ANSWERS = ("answer", "para", "pert")  # original, paraphrased, perturbed (mean over options)
TARGET_ROW = "target (before unlearning)"
REFERENCE_ROW = "retain reference (vs target)"


class NoDataError(RuntimeError):
    """The results folder has nothing this analysis can read; the message says why."""


# Selecting readings ------------------------------------------------------------------------------

def select_readings(results: str | Path, include_all: bool = False) -> pd.DataFrame:
    """Completed runs of ``results`` (``reporting.read_runs``), only those that stopped as matched
    unless ``include_all``, with a ``curve`` label (method + the mask settings that vary)."""
    try:
        runs = read_runs(results)
    except (FileNotFoundError, ValueError) as error:
        raise NoDataError(str(error)) from error
    if not include_all:
        if "stop.status" not in runs.columns or not (runs["stop.status"] == "matched").any():
            found = runs["stop.status"].value_counts().to_dict() if "stop.status" in runs.columns else "none"
            raise NoDataError(f"{results}: no completed run stopped as matched (stop.status: {found}); "
                              "use --all to take every run")
        runs = runs[runs["stop.status"] == "matched"].reset_index(drop=True)
    columns = curve_columns(runs, setting_columns(runs))
    runs = runs.copy()
    runs["curve"] = [curve_label(row, columns) for _, row in runs.iterrows()]
    runs["target"] = target_seeds(runs)
    runs["data"] = data_key(runs)
    return runs


# Per-item log-probs ------------------------------------------------------------------------------

def forget_logprobs(items: pd.DataFrame) -> pd.DataFrame:
    """Forget items of one ``items.parquet`` as one row per item: for each model the per-token
    log-prob of the answer, the paraphrased answer and the perturbed answers (mean over options),
    and log R (from the stored ``truth_ratio``, which FQ uses). Columns ``<what>.<model>``."""
    forget = items[(items["split"] == "forget") & items["model"].isin(MODELS)]
    frame = pd.DataFrame({
        "item_id": forget["item_id"].astype(str).to_numpy(),
        "model": forget["model"].to_numpy(),
        "num_tokens": forget["num_tokens"].to_numpy(),
        "answer": -forget["nll"].to_numpy(dtype=float),
        "para": -forget["nll_paraphrased"].to_numpy(dtype=float),
        "pert": [-float(np.mean(options)) for options in forget["nll_perturbed"]],
        "log_r": np.log(forget["truth_ratio"].to_numpy(dtype=float)),
    })
    wide = frame.pivot(index="item_id", columns="model", values=["answer", "para", "pert", "log_r"])
    wide.columns = [f"{what}.{model}" for what, model in wide.columns]
    tokens = frame.drop_duplicates("item_id").set_index("item_id")["num_tokens"]
    return wide.join(tokens).reset_index()


def add_changes(wide: pd.DataFrame) -> pd.DataFrame:
    """Log-prob changes vs the target: ``d_<what>`` = unlearned - target and ``ref_d_<what>`` =
    reference - target, for the three answers and log R."""
    wide = wide.copy()
    for what in (*ANSWERS, "log_r"):
        wide[f"d_{what}"] = wide[f"{what}.unlearned"] - wide[f"{what}.target"]
        wide[f"ref_d_{what}"] = wide[f"{what}.reference"] - wide[f"{what}.target"]
    return wide


def item_table(results: str | Path, readings: pd.DataFrame) -> pd.DataFrame:
    """One row per (reading, forget item): the reading's curve, target, seed, lr and the item's
    log-probs and changes. Readings without an ``items.parquet`` holding the three models' forget
    rows are left out (a note on stderr); none at all is an error."""
    frames, missing = [], []
    for _, run in readings.iterrows():
        path = Path(results) / "runs" / str(run["run_id"]) / "items.parquet"
        if not path.exists():
            missing.append(f"{run['run_id']} (no items.parquet)")
            continue
        wide = forget_logprobs(pd.read_parquet(path))
        absent = [model for model in MODELS if f"answer.{model}" not in wide.columns]
        if wide.empty or absent:
            missing.append(f"{run['run_id']} (no forget rows of {absent or list(MODELS)})")
            continue
        wide = add_changes(wide)
        wide.insert(0, "lr", run.get("config.unlearn.lr"))
        wide.insert(0, "seed", run.get("config.run.seed"))
        wide.insert(0, "data", run["data"])
        wide.insert(0, "target", run["target"])
        wide.insert(0, "curve", run["curve"])
        wide.insert(0, "run_id", run["run_id"])
        frames.append(wide)
    if missing:
        print(f"note: {len(missing)} reading(s) left out: " + "; ".join(missing), file=sys.stderr)
    if not frames:
        raise NoDataError(f"{results}: none of the {len(readings)} selected run(s) has a usable "
                          "runs/<run_id>/items.parquet (forget rows of unlearned, target and reference)")
    return pd.concat(frames, ignore_index=True)


# Per-reading statistics --------------------------------------------------------------------------

def truth_ratio_score(log_r: np.ndarray) -> float:
    """Forget truth-ratio score mean(min(R, 1/R)) = mean(exp(-|log R|))."""
    return float(np.mean(np.exp(-np.abs(log_r))))


def iqr(values: np.ndarray) -> float:
    """Interquartile range (75th - 25th percentile)."""
    high, low = np.percentile(values, [75, 25])
    return float(high - low)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation; NaN when either side is constant or there are fewer than 3 items."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y).statistic)


def change_stats(items: pd.DataFrame, prefix: str) -> dict[str, float]:
    """Mean log-prob changes (``prefix`` "d_": unlearned - target, "ref_d_": reference - target) and
    the per-item view: Spearman(Δ answer, Δ perturbed), Spearman(Δ answer, Δ paraphrased),
    mean Δ perturbed / mean Δ answer, share of items whose log R rose."""
    d = {what: items[f"{prefix}{what}"].to_numpy(dtype=float) for what in (*ANSWERS, "log_r")}
    mean_answer = float(np.mean(d["answer"]))
    return {
        "d_answer": mean_answer, "d_para": float(np.mean(d["para"])), "d_pert": float(np.mean(d["pert"])),
        "d_log_r": float(np.mean(d["log_r"])),
        "rho_answer_pert": spearman(d["answer"], d["pert"]),
        "rho_answer_para": spearman(d["answer"], d["para"]),
        "pert_over_answer": float(np.mean(d["pert"])) / mean_answer if mean_answer != 0 else float("nan"),
        "log_r_rose": float(np.mean(d["log_r"] > 0)),
    }


def standing(items: pd.DataFrame, model: str) -> dict[str, float]:
    """Where ``model``'s forget items stand against the retain reference's: forget probability
    (mean of exp(-nll)), KS statistic D and p-value (= FQ) of the truth ratios, D once both medians of
    log R are moved to 0 (what is left is a difference of shape, not of location), truth-ratio score,
    median and IQR of log R and the share of items whose R is above the reference's median R."""
    log_r, ref_log_r = items[f"log_r.{model}"].to_numpy(float), items["log_r.reference"].to_numpy(float)
    ks = stats.ks_2samp(np.exp(log_r), np.exp(ref_log_r))
    return {
        "forget_prob": float(np.mean(np.exp(items[f"answer.{model}"]))),
        "forget_quality": float(ks.pvalue), "ks_d": float(ks.statistic),
        # D left once the medians of log R are aligned: how much of D is a shift, how much shape.
        "ks_d_aligned": float(stats.ks_2samp(log_r - np.median(log_r),
                                             ref_log_r - np.median(ref_log_r)).statistic),
        "tr_score": truth_ratio_score(log_r),
        "median_log_r": float(np.median(log_r)), "iqr_log_r": iqr(log_r),
        "above_ref_median": float(np.mean(log_r > np.median(ref_log_r))),
    }


def reading_stats(items: pd.DataFrame, run: pd.Series) -> dict[str, float]:
    """One reading's figures: :func:`standing` of the unlearned model and :func:`change_stats`
    (unlearned - target). FQ is recomputed from the items; a mismatch with the runs table's
    ``forget_quality`` is noted on stderr."""
    row = standing(items, "unlearned")
    recorded = run.get("forget_quality")
    if pd.notna(recorded) and not np.isclose(float(recorded), row["forget_quality"], rtol=1e-6, atol=1e-12):
        print(f"note: run {run['run_id']}: forget_quality {float(recorded):.6g} in runs.parquet, "
              f"{row['forget_quality']:.6g} from its items", file=sys.stderr)
    return {**row, **change_stats(items, "d_")}


def per_reading(items: pd.DataFrame, readings: pd.DataFrame) -> pd.DataFrame:
    """One row per reading (:func:`reading_stats`), plus, per target (and data), a row for the
    target itself (:data:`TARGET_ROW`: where unlearning started) and one for its retain reference
    (:data:`REFERENCE_ROW`: its changes are reference - target)."""
    by_run = readings.set_index("run_id")
    rows = [{"curve": run_items["curve"].iloc[0], "run_id": run_id,
             **reading_stats(run_items, by_run.loc[run_id])}
            for run_id, run_items in items.groupby("run_id", sort=False)]
    # Runs of one target (on the same data) share it and its reference: their evaluations are the
    # same in each run's items, so the first run's stand for them.
    for (target, _), target_items in items.groupby(["target", "data"], sort=True):
        first = target_items[target_items["run_id"] == target_items["run_id"].iloc[0]]
        rows.append({"curve": TARGET_ROW, "run_id": f"target {target}", **standing(first, "target")})
        rows.append({"curve": REFERENCE_ROW, "run_id": f"reference of target {target}",
                     **standing(first, "reference"), **change_stats(first, "ref_d_")})
    return pd.DataFrame(rows)


def curve_summary(readings: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over the readings of each curve (``<stat>_mean``, ``<stat>_std``) and ``n``;
    curves in order of first appearance, the target and reference rows last."""
    order = list(dict.fromkeys(readings["curve"]))
    order = [curve for curve in order if curve not in (TARGET_ROW, REFERENCE_ROW)] + \
        [row for row in (TARGET_ROW, REFERENCE_ROW) if row in order]
    columns = [column for column in readings.columns if column not in ("curve", "run_id")]
    grouped = readings.groupby("curve", sort=False)[columns]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{stat}_{how}" for stat, how in table.columns]
    table.insert(0, "n", grouped.size())
    return table.loc[order].reset_index()


# Markdown ----------------------------------------------------------------------------------------

def cell(row: pd.Series, stat: str, digits: int = 3) -> str:
    """``mean ± std`` of ``stat`` (std left out for one reading or when undefined)."""
    mean, std = row[f"{stat}_mean"], row[f"{stat}_std"]
    if pd.isna(mean):
        return "–"
    text = f"{mean:.{digits}g}"
    return text if pd.isna(std) or row["n"] < 2 else f"{text} ± {std:.2g}"


def markdown(table: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table: curve, n, then one ``mean ± std`` column per (stat, header); rows without
    any of these figures are left out."""
    header = ["curve", "n", *(title for _, title in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        if all(pd.isna(row[f"{stat}_mean"]) for stat, _ in columns):
            continue  # the target row has no change from itself
        lines.append("| " + " | ".join([row["curve"], str(int(row["n"])),
                                         *(cell(row, stat) for stat, _ in columns)]) + " |")
    return "\n".join(lines)


STANDING = (("forget_prob", "forget prob"), ("forget_quality", "FQ"), ("ks_d", "KS D"),
            ("ks_d_aligned", "KS D, medians aligned"),
            ("tr_score", "TR score"), ("median_log_r", "median log R"), ("iqr_log_r", "IQR log R"),
            ("above_ref_median", "share R > ref. median"))
CHANGES = (("d_answer", "Δ answer"), ("d_para", "Δ paraphrased"), ("d_pert", "Δ perturbed"),
           ("d_log_r", "Δ log R"))
PER_ITEM = (("rho_answer_pert", "ρ(Δ answer, Δ perturbed)"), ("rho_answer_para", "ρ(Δ answer, Δ paraphrased)"),
            ("pert_over_answer", "Δ perturbed / Δ answer"), ("log_r_rose", "share log R rose"))


def report(table: pd.DataFrame, selection: str) -> str:
    """The three Markdown tables with their captions."""
    return "\n\n".join([
        f"# Why forget quality differs at matched forget probability\n\n{selection}",
        "## Where the readings stand (forget items; mean ± std over readings)\n\n"
        "KS D and FQ against the retain reference's truth ratios (D, medians aligned: after moving both "
        "medians of log R to 0); TR score = mean(min(R, 1/R)); "
        "log R = logp(perturbed) - logp(paraphrased); last column: share of items whose R exceeds the "
        "reference's median R (0.5 = same median). The last two rows: the target before unlearning and the "
        "retain reference itself (n = targets).\n\n"
        + markdown(table, STANDING),
        "## Which answers lose probability (mean per-token log-prob change vs the target)\n\n"
        "Unlearned - target per curve; reference - target in the reference row. "
        "Δ log R = Δ perturbed - Δ paraphrased.\n\n" + markdown(table, CHANGES),
        "## Per item: does the method lower the perturbed answers along with the answer?\n\n"
        "Spearman over forget items of the log-prob changes (per reading, then mean ± std); "
        "Δ perturbed / Δ answer: ratio of the mean changes; share of items whose log R rose.\n\n"
        + markdown(table, PER_ITEM),
    ])


# Entry point -------------------------------------------------------------------------------------

def analyse(results: str | Path, include_all: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The per-curve table, the per-item table and the selection's description."""
    readings = select_readings(results, include_all)
    items = item_table(results, readings)
    table = curve_summary(per_reading(items, readings))
    used = items["run_id"].nunique()
    what = "every completed run" if include_all else "runs that stopped as matched (stop.status == matched)"
    selection = (f"Results: `{results}`; readings: {what}, {used} with items; "
                 f"{items['target'].nunique()} target(s); {items['item_id'].nunique()} forget items.")
    return table, items, selection


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results folder holding runs.parquet and runs/<run_id>/")
    parser.add_argument("--out", help="folder for the CSVs (default <results>/report)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--matched-only", dest="include_all", action="store_false",
                       help="only runs with stop.status == matched (default)")
    which.add_argument("--all", dest="include_all", action="store_true", help="every completed run")
    parser.set_defaults(include_all=False)
    args = parser.parse_args(argv)
    try:
        table, items, selection = analyse(args.results, args.include_all)
    except NoDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.results) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "why_forget_quality.csv", index=False)
    items.to_csv(out / "why_forget_quality_items.csv", index=False)
    print(report(table, selection))
    print(f"\nWrote {out / 'why_forget_quality.csv'} and {out / 'why_forget_quality_items.csv'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
