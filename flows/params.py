"""Which configuration fields each stage reads: its cache-key parameters.

A stage's key covers exactly these fields, so changing ``mask.threshold`` re-runs only
threshold_mask and what follows, changing ``attribution.steps`` re-runs attribution onwards, and
changing ``unlearn.lr`` re-runs unlearning onwards. Fields that do not change results (device,
store, results folder, run name, tags, fault injection) are in no key.
"""

from __future__ import annotations

from typing import Any

from simu_core.config import SimuConfig

MASKED_METHODS = ("simu", "simu_npo")


def uses_mask(config: SimuConfig) -> bool:
    """True when the unlearning method trains only critical neurons (needs attribution)."""
    return config.unlearn.method in MASKED_METHODS


def stage_params(config: SimuConfig) -> dict[str, dict[str, Any]]:
    """Cache-key parameters of every stage."""
    tree = config.model_dump(mode="json")
    model = tree["model"]
    model_identity = {key: model[key] for key in ("base", "target", "tokenizer", "dtype", "trust_remote_code", "max_length")}
    training = {key: value for key, value in model.items() if key not in ("target", "retain_reference")}
    return {
        "prepare_data": {"data": tree["data"], "base": model["base"], "tokenizer": model["tokenizer"],
                         "tiny_vocab_size": model["tiny"]["vocab_size"]},
        "train_target": {"model": training, "autocast": tree["run"]["dtype"]},
        "train_retain_reference": {"model": training, "retain_reference": model["retain_reference"],
                                   "autocast": tree["run"]["dtype"]},
        "attribute": {"attribution": tree["attribution"], "model": model_identity, "seed": tree["run"]["seed"]},
        "threshold_mask": {"mask": tree["mask"]},
        "unlearn": {"unlearn": tree["unlearn"], "model": model_identity, "seed": tree["run"]["seed"],
                    "autocast": tree["run"]["dtype"]},
        "evaluate": {"eval": tree["eval"], "model": model_identity, "autocast": tree["run"]["dtype"]},
    }


def run_name(config: SimuConfig) -> str:
    """Readable run name: method, threshold (masked methods), lr and seed, or ``run.name``."""
    if config.run.name:
        return config.run.name
    parts = [config.data.benchmark, config.data.split, config.unlearn.method]
    if uses_mask(config):
        parts.append(f"t{config.mask.threshold:g}-{config.mask.variant}-m{config.attribution.steps}")
    parts += [f"lr{config.unlearn.lr:g}", f"s{config.run.seed}"]
    return "-".join(parts)
