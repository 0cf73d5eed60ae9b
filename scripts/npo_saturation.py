"""How far NPO's and SimNPO's losses still push each forget item where their runs ended.

NPO's loss on an item is ``-(2/β) log σ(-β r)`` with ``r = Σ_t log π(a_t) - log π_ref(a_t)`` summed over
the answer's tokens (``simu_core.unlearning.losses.npo_loss``; π_ref = the target), so its gradient is
gradient ascent's times ``w = 2 σ(β r)``. SimNPO's (``simnpo_loss``) is ``-(2/β) log σ(-β m - γ)`` on the
mean per-token log-probability ``m``: its weight is ``w = 2 σ(β m + γ)``. Both start at 1 and fall as the
answer's probability falls; ``r`` sums over the tokens, so NPO's weight vanishes on long answers while
each token is still probable.

This script reads each NPO / SimNPO run's ``items.parquet`` (forget split: the unlearned model, and the
target for NPO's ``r``) and its ``config.yaml`` (β, γ), and prints per run: the forget probability (mean
over items of the per-token probability ``exp(-nll)``), the median answer length in tokens, and the
median and quartiles of ``w`` over the forget items.

Usage::

    python scripts/npo_saturation.py --results results/matched-refined/tofu-probe
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.special import expit


def item_weights(items: pd.DataFrame, unlearn: dict) -> pd.Series:
    """Per forget item, the loss's gradient weight relative to gradient ascent (see the module docstring)."""
    forget = items[items["split"] == "forget"]
    unlearned = forget[forget["model"] == "unlearned"].set_index("item_id")
    if unlearn["method"].endswith("simnpo"):
        return 2 * expit(unlearn["simnpo_beta"] * -unlearned["nll"] + unlearn["simnpo_gamma"])
    target = forget[forget["model"] == "target"].set_index("item_id").loc[unlearned.index]
    log_ratio = -(unlearned["nll"] - target["nll"]) * unlearned["num_tokens"]
    return 2 * expit(unlearn["npo_beta"] * log_ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a results folder (runs/<run_id>/...)")
    args = parser.parse_args()
    rows = []
    for run_dir in sorted((args.results / "runs").iterdir()):
        config_file, items_file = run_dir / "config.yaml", run_dir / "items.parquet"
        if not (config_file.exists() and items_file.exists()):
            continue
        config = yaml.safe_load(config_file.read_text())
        unlearn = config["unlearn"]
        if unlearn["method"] not in ("npo", "simnpo", "so_npo", "so_simnpo"):
            continue
        items = pd.read_parquet(items_file)
        weights = item_weights(items, unlearn)
        unlearned = items[(items["split"] == "forget") & (items["model"] == "unlearned")]
        rows.append({"method": unlearn["method"], "lr": unlearn["lr"], "target": config["model"]["finetune"]["seed"],
                     "seed": config["run"]["seed"], "forget_prob": float(np.exp(-unlearned["nll"]).mean()),
                     "answer_tokens_median": float(unlearned["num_tokens"].median()),
                     "w_median": weights.median(), "w_q25": weights.quantile(0.25), "w_q75": weights.quantile(0.75)})
    if not rows:
        raise SystemExit(f"no NPO or SimNPO run with items.parquet under {args.results / 'runs'}")
    # A rerun served from the store has a run folder of its own with the same items: one row per reading.
    table = pd.DataFrame(rows).drop_duplicates(["method", "lr", "target", "seed"]).sort_values(
        ["method", "lr", "target", "seed"])
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3g}"))


if __name__ == "__main__":
    main()
