"""Write a preferred-answer file for the dpo loss (``unlearn.preferred_source``): one JSON line
``{"question", "answer"}`` per forget question of a config's benchmark, the answer being one of the
benchmark's own perturbed (plausible but wrong) answers to it.

This is what a user brings to DPO: an answer to prefer over the true one. The perturbed answers are
the benchmark's own, written by its authors (TOFU) or its generator (the built-in benchmark), so the
file is fixed by the data, not by a model; ``--choice`` picks which of them (default: the first).

    .venv/bin/python scripts/preferred_answers.py --config data/configs/mlp_localised.yaml \
        --out results/losses/preferred_testbed.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simu_core.config import load_config
from simu_core.data import load_benchmark


def preferred_rows(config_path: str | None, overrides: list[str], choice: int) -> list[dict[str, str]]:
    """The forget questions of the config's benchmark, each with its ``choice``-th perturbed answer."""
    benchmark = load_benchmark(load_config(config_path, overrides).data)
    forget = benchmark["forget"]
    rows = []
    for question, perturbed in zip(forget["question"], forget["perturbed_answer"]):
        options = list(perturbed)
        if not 0 <= choice < len(options):
            raise ValueError(f"--choice {choice}: the question {question!r} has {len(options)} perturbed answers")
        rows.append({"question": str(question), "answer": str(options[choice])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="config file (default: the built-in default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value override")
    parser.add_argument("--choice", type=int, default=0, help="which perturbed answer (0-based)")
    parser.add_argument("--out", required=True, help="the JSON Lines file to write")
    args = parser.parse_args()
    rows = preferred_rows(args.config, args.overrides, args.choice)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} preferred answers: {out}")


if __name__ == "__main__":
    main()
