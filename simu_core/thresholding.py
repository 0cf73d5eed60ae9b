"""Thresholding attribution scores into critical-neuron masks, and the dual-neuron analysis
(SIMU step 1b, ``simu-method.md``).

Rules
    ``layer_relative`` (the default; what "threshold" means): neuron k of layer l is critical when
    ``Att(l, k) >= t * max_k' Att(l, k')``, t in (0, 1]. A layer whose maximum is not positive has no
    critical neuron. **Decision:** the method page writes ``>``; we use ``>=`` so that t = 1 keeps
    exactly each layer's maximum (with ``>`` it would keep nothing). The two differ only for a
    score exactly equal to t * max.

    ``global_top_fraction`` (ablations): the ``ceil(fraction * all neurons)`` highest scores over
    all layers, ties broken by (layer, neuron); only positive scores qualify, as in the layer rule
    (a neuron that does not raise the answer's log-probability is never critical).

    ``random`` (the control): the layer-relative critical sets are computed as usual (C_f, C_r
    and the variant's mask are recorded), but the mask that is trained holds, in every layer, as
    many neurons as the variant's layer-relative mask, drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)``. SIMU with this mask is SIMU at the same sparsity with
    the attribution's choice taken away.

Scores (``mask.score``)
    ``forget`` (the paper): C_f thresholds the forget-set attribution. ``contrastive``: C_f
    thresholds ``Att_f / n_f - Att_r / n_r`` (each set's score per attributed answer token), the
    neurons that help the forget answers *more than* the retain answers; C_r is unchanged. A
    neuron every answer needs (formatting, frequent tokens) scores high on both sets and drops
    out of the contrastive C_f. See :func:`contrastive_scores`.

Variants (C_f = forget-critical, C_r = retain-critical, same rule and t)
    ``include`` mask = C_f (the default), ``exclude`` mask = C_f minus C_r, ``only`` mask =
    C_f intersect C_r (the dual neurons). ``exclude`` and ``only`` partition ``include``.

Analysis
    :func:`dual_neuron_analysis` returns one row per (threshold, layer): neurons, |C_f|, |C_r|,
    |dual|, masked and fraction masked. :func:`threshold_jaccard` returns, as a second DataFrame,
    the Jaccard overlap of the whole-model masks (all layers' (layer, neuron) pairs) between every
    pair of thresholds. Two empty masks have Jaccard 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from simu_core.attribution import AttributionResult
from simu_core.masking import NeuronMask, random_neurons

RULES = ("layer_relative", "global_top_fraction", "random")
VARIANTS = ("include", "exclude", "only")

Scores = AttributionResult | Sequence[np.ndarray]


def _layers(scores: Scores, name: str) -> list[np.ndarray]:
    if isinstance(scores, AttributionResult):
        scores = scores.scores
    layers = [np.asarray(layer, dtype=np.float64).reshape(-1) for layer in scores]
    if not layers:
        raise ValueError(f"{name} scores have no layer")
    for index, layer in enumerate(layers):
        if layer.size == 0:
            raise ValueError(f"{name} scores: layer {index} has no neuron")
        if not np.all(np.isfinite(layer)):
            raise ValueError(f"{name} scores: layer {index} holds non-finite values (NaN or inf)")
    return layers


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ValueError(f"threshold t must be a number in (0, 1], got {threshold!r}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold t must be in (0, 1] (critical when score >= t * layer max), got {threshold}")
    return float(threshold)


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise ValueError(f"top_fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def layer_relative_critical(scores: Scores, threshold: float) -> NeuronMask:
    """Critical neurons by the layer-relative rule: score >= t * layer max, max > 0."""
    t = _check_threshold(threshold)
    per_layer = []
    for layer in _layers(scores, "attribution"):
        top = layer.max()
        per_layer.append(layer >= t * top if top > 0 else np.zeros(layer.size, dtype=bool))
    return NeuronMask.from_boolean(per_layer)


def global_top_fraction_critical(scores: Scores, fraction: float) -> NeuronMask:
    """Critical neurons by the global rule: the top ceil(fraction * N) positive scores of all layers."""
    fraction = _check_fraction(fraction)
    layers = _layers(scores, "attribution")
    flat = np.concatenate(layers)
    count = math.ceil(fraction * flat.size)
    # Stable sort of -score: ties keep (layer, neuron) order, so the choice is deterministic.
    chosen = np.argsort(-flat, kind="stable")[:count]
    chosen = chosen[flat[chosen] > 0]
    selected = np.zeros(flat.size, dtype=bool)
    selected[chosen] = True
    bounds = np.cumsum([0] + [layer.size for layer in layers])
    return NeuronMask.from_boolean([selected[bounds[i] : bounds[i + 1]] for i in range(len(layers))])


def critical_neurons(
    scores: Scores, rule: str = "layer_relative", threshold: float = 0.2, top_fraction: float = 0.05
) -> NeuronMask:
    """Critical set of one score set under ``rule`` (``layer_relative`` uses t, the global rule the fraction)."""
    if rule == "layer_relative":
        return layer_relative_critical(scores, threshold)
    if rule == "global_top_fraction":
        return global_top_fraction_critical(scores, top_fraction)
    if rule == "random":
        # The critical sets of the random control are the layer-relative ones (see select_mask).
        return layer_relative_critical(scores, threshold)
    raise ValueError(f"threshold rule must be one of {list(RULES)}, got {rule!r}")


def _boolean(mask: NeuronMask) -> list[np.ndarray]:
    vectors = []
    for indices, size in zip(mask.neurons, mask.num_neurons):
        vector = np.zeros(size, dtype=bool)
        vector[list(indices)] = True
        vectors.append(vector)
    return vectors


def apply_variant(critical_forget: NeuronMask, critical_retain: NeuronMask | None, variant: str) -> NeuronMask:
    """The mask of a variant: include = C_f, exclude = C_f minus C_r, only = C_f intersect C_r."""
    if variant not in VARIANTS:
        raise ValueError(f"mask variant must be one of {list(VARIANTS)}, got {variant!r}")
    if variant == "include":
        return critical_forget
    if critical_retain is None:
        raise ValueError(f"mask variant {variant!r} needs retain-set scores (dual neurons = C_f and C_r)")
    if list(critical_retain.num_neurons) != list(critical_forget.num_neurons):
        raise ValueError(
            f"forget and retain masks differ in shape: {list(critical_forget.num_neurons)} vs "
            f"{list(critical_retain.num_neurons)} neurons per layer"
        )
    forget, retain = _boolean(critical_forget), _boolean(critical_retain)
    if variant == "exclude":
        return NeuronMask.from_boolean([f & ~r for f, r in zip(forget, retain)])
    return NeuronMask.from_boolean([f & r for f, r in zip(forget, retain)])


@dataclass(frozen=True)
class MaskSelection:
    """The mask a run uses, with the critical sets it came from."""

    mask: NeuronMask
    critical_forget: NeuronMask
    critical_retain: NeuronMask | None
    variant: str
    rule: str
    threshold: float

    def table(self) -> pd.DataFrame:
        """Mask table ``(layer, neuron, critical_forget, critical_retain, dual, in_mask)``."""
        return self.mask.to_table(critical_forget=self.critical_forget, critical_retain=self.critical_retain)

    def counts(self) -> dict[str, object]:
        """Totals and per-layer masked counts (JSON-able)."""
        retain = self.critical_retain
        dual = apply_variant(self.critical_forget, retain, "only").total() if retain is not None else 0
        return {
            "masked": self.mask.total(),
            "critical_forget": self.critical_forget.total(),
            "critical_retain": retain.total() if retain is not None else None,
            "dual": dual,
            "fraction_masked": self.mask.fraction(),
            "masked_per_layer": self.mask.counts(),
        }


def contrastive_scores(forget_scores: Scores, forget_samples: int, retain_scores: Scores, retain_samples: int) -> list[np.ndarray]:
    """Per neuron, forget score per answer token minus retain score per answer token."""
    if forget_samples < 1 or retain_samples < 1:
        raise ValueError(
            f"contrastive scores need positive sample counts, got forget {forget_samples}, retain {retain_samples}"
        )
    forget, retain = _layers(forget_scores, "forget"), _layers(retain_scores, "retain")
    if [len(layer) for layer in forget] != [len(layer) for layer in retain]:
        raise ValueError("forget and retain scores have different shapes")
    return [f / forget_samples - r / retain_samples for f, r in zip(forget, retain)]


def select_mask(
    forget_scores: Scores,
    retain_scores: Scores | None = None,
    threshold: float = 0.2,
    variant: str = "include",
    rule: str = "layer_relative",
    top_fraction: float = 0.05,
    seed: int = 0,
) -> MaskSelection:
    """Threshold forget (and retain) scores and build the variant's mask (``seed``: rule ``random`` only)."""
    if variant not in VARIANTS:
        raise ValueError(f"mask variant must be one of {list(VARIANTS)}, got {variant!r}")
    critical_forget = critical_neurons(forget_scores, rule, threshold, top_fraction)
    critical_retain = None if retain_scores is None else critical_neurons(retain_scores, rule, threshold, top_fraction)
    mask = apply_variant(critical_forget, critical_retain, variant)
    if rule == "random":
        mask = random_neurons(mask.counts(), mask.num_neurons, np.random.default_rng(seed))
    return MaskSelection(mask, critical_forget, critical_retain, variant, rule, float(threshold))


def jaccard(first: NeuronMask, second: NeuronMask) -> float:
    """|A intersect B| / |A union B| over (layer, neuron) pairs; 1.0 when both are empty."""
    if list(first.num_neurons) != list(second.num_neurons):
        raise ValueError("masks of different shapes cannot be compared")
    a = {(layer, n) for layer, indices in enumerate(first.neurons) for n in indices}
    b = {(layer, n) for layer, indices in enumerate(second.neurons) for n in indices}
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [_check_threshold(t) for t in thresholds]
    if not values:
        raise ValueError("the analysis needs at least one threshold")
    return values


def dual_neuron_analysis(
    forget_scores: Scores,
    retain_scores: Scores | None,
    thresholds: Sequence[float],
    variant: str = "include",
) -> pd.DataFrame:
    """Per (threshold, layer): neurons, |C_f|, |C_r|, |dual|, masked, fraction masked (layer-relative rule).

    Columns: ``threshold, layer, neurons, critical_forget, critical_retain, dual, masked,
    fraction_masked``. Without retain scores, ``critical_retain`` and ``dual`` are 0 (and only the
    ``include`` variant is possible).
    """
    rows = []
    for t in _check_thresholds(thresholds):
        selection = select_mask(forget_scores, retain_scores, t, variant)
        forget = _boolean(selection.critical_forget)
        retain = _boolean(selection.critical_retain) if selection.critical_retain is not None else None
        for layer, size in enumerate(selection.mask.num_neurons):
            masked = len(selection.mask.neurons[layer])
            rows.append(
                {
                    "threshold": t,
                    "layer": layer,
                    "neurons": size,
                    "critical_forget": int(forget[layer].sum()),
                    "critical_retain": int(retain[layer].sum()) if retain is not None else 0,
                    "dual": int((forget[layer] & retain[layer]).sum()) if retain is not None else 0,
                    "masked": masked,
                    "fraction_masked": masked / size,
                }
            )
    return pd.DataFrame(rows)


def threshold_jaccard(
    forget_scores: Scores,
    retain_scores: Scores | None,
    thresholds: Sequence[float],
    variant: str = "include",
) -> pd.DataFrame:
    """Jaccard of the whole-model masks between every pair of thresholds (layer-relative rule).

    Columns ``threshold_a, threshold_b, masked_a, masked_b, jaccard``; one row per ordered pair
    with ``threshold_a < threshold_b`` (distinct thresholds, sorted).
    """
    values = sorted(set(_check_thresholds(thresholds)))
    masks = {t: select_mask(forget_scores, retain_scores, t, variant).mask for t in values}
    rows = []
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            rows.append(
                {
                    "threshold_a": a,
                    "threshold_b": b,
                    "masked_a": masks[a].total(),
                    "masked_b": masks[b].total(),
                    "jaccard": jaccard(masks[a], masks[b]),
                }
            )
    return pd.DataFrame(rows, columns=["threshold_a", "threshold_b", "masked_a", "masked_b", "jaccard"])
