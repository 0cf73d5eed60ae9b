"""scripts/npo_saturation.py: each loss's gradient weight per forget item, against the formulas
written out here (NPO: 2σ(β·Σ log-ratio over the answer's tokens); SimNPO: 2σ(β·mean log p + γ))."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.conftest import load_script


def _items() -> pd.DataFrame:
    # Two forget items (20 and 60 tokens), the unlearned model 0.5 and 1.0 nats/token below the target.
    rows = [{"split": "forget", "model": "target", "item_id": "f0", "nll": 0.1, "num_tokens": 20},
            {"split": "forget", "model": "target", "item_id": "f1", "nll": 0.2, "num_tokens": 60},
            {"split": "forget", "model": "unlearned", "item_id": "f0", "nll": 0.6, "num_tokens": 20},
            {"split": "forget", "model": "unlearned", "item_id": "f1", "nll": 1.2, "num_tokens": 60},
            {"split": "retain", "model": "unlearned", "item_id": "r0", "nll": 9.0, "num_tokens": 5}]
    return pd.DataFrame(rows)


def _sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def test_npo_weight_sums_the_log_ratio_over_the_answer():
    weights = load_script("npo_saturation").item_weights(_items(), {"method": "npo", "npo_beta": 0.1})
    # f0: r = -0.5 * 20 = -10; f1: r = -1.0 * 60 = -60: the longer answer is pushed far less.
    assert weights["f0"] == pytest.approx(2 * _sigmoid(0.1 * -10), rel=1e-12)
    assert weights["f1"] == pytest.approx(2 * _sigmoid(0.1 * -60), rel=1e-12)
    assert list(weights.index) == ["f0", "f1"]  # forget items only


def test_simnpo_weight_reads_the_mean_log_probability():
    unlearn = {"method": "simnpo", "simnpo_beta": 4.5, "simnpo_gamma": 0.5}
    weights = load_script("npo_saturation").item_weights(_items(), unlearn)
    assert weights["f0"] == pytest.approx(2 * _sigmoid(4.5 * -0.6 + 0.5), rel=1e-12)
    assert weights["f1"] == pytest.approx(2 * _sigmoid(4.5 * -1.2 + 0.5), rel=1e-12)
