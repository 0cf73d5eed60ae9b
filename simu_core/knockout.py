"""Knockout check of a critical-neuron mask: a causal test of attribution.

Attribution claims that the critical forget neurons carry the forget set. The check tests it
directly, with nothing trained: the activations of a neuron set are set to zero at every position
(forward pre-hooks on the MLP down projections, i.e. the neurons' down-projection columns stop
contributing, which is exactly what SIMU's unlearning edits), and the mean answer log-probability
of the forget items and of the retain items is measured against the intact model.

Held-out items (:func:`holdout_split`). The set is chosen on some items and measured on others:
measured on the items that chose it, a knockout would partly measure how well attribution fits
those very items. The forget split is cut in two by a seeded permutation; the critical set is
attributed and thresholded on the first half (at most ``attribution.max_items`` of it) and an
equally sized retain sample, with the run's attribution and mask settings, and the knockout
measures the second half and as many other retain items (the same number per side, at most
``knockout.max_items``). So the check tests the *method* (attribution + threshold) on unseen
items of the same distribution; the set it knocks out is not the run's own mask, which is
attributed on every forget item. The stage (``simu_core.stages.knockout``) does the attribution.

Sets compared (all with the same number of neurons in every layer as the critical set):

``critical``
    the critical forget neurons of the mask's variant (C_f, C_f minus C_r, or the dual neurons),
    by the mask rule (the ``random`` rule's critical sets are the layer-relative ones);
``random``
    neurons drawn uniformly without replacement from each layer (critical ones may be drawn),
    several draws (``numpy.random.default_rng([seed, draw])``), reported as mean and std;
``retain_critical``
    per layer, the neurons with the highest retain-set scores (of the attributed retain half).

Per set: ``forget_drop`` = intact minus knocked-out mean answer log-probability on the forget items
(nats per answer token; positive = the knockout hurts), ``retain_drop`` likewise on the retain
items, the same two for the length-normalised answer probability ``exp(mean log p)``, and
``selectivity`` = forget_drop / retain_drop. The headline ratio is critical / random on the
forget drop. A curve repeats the comparison for the top-k neurons per layer by forget score
against k random neurons per layer (``default_rng([seed, 1_000_003, k, draw])``), for a few k.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from simu_core.masking import NeuronMask, random_neurons
from simu_core.models.adapter import ArchitectureAdapter
from simu_core.prompting import EncodedExample
from simu_core.scoring import answer_nlls

SET_KINDS = ("critical", "random", "retain_critical")
#: Entropy tag of the item split's generators (apart from the random sets' ``[seed, draw]``).
_SPLIT_STREAM = 2_000_003


@dataclass(frozen=True)
class HoldoutSplit:
    """Rows (positions in their split, sorted) the knockout attributes on and rows it measures."""

    forget_attributed: np.ndarray
    forget_measured: np.ndarray
    retain_attributed: np.ndarray
    retain_measured: np.ndarray


def check_request_sizes(requests: Sequence[Sequence[str]]) -> None:
    """Sequential deletion requests with the knockout check: each request's forget items are split
    as :func:`holdout_split` splits a forget set, so each needs at least 2."""
    for index, request in enumerate(requests, 1):
        if len(request) < 2:
            raise ValueError(
                f"data.requests: request {index} has {len(request)} forget item: the knockout check chooses its neurons "
                "on half of a request's forget items and measures the other half, so it needs at least 2 (give the "
                "request more items, or set knockout.enabled=false)"
            )


def holdout_split(
    forget_size: int, retain_size: int, seed: int, attribute_limit: int | None = None, measure_limit: int | None = None
) -> HoldoutSplit:
    """Split the forget and retain items into an attributed part and a disjoint measured part.

    Forget: a permutation (``default_rng([seed, 2_000_003, 0])``) cut in two; the first
    ``ceil(n / 2)`` items, at most ``attribute_limit`` of them, are attributed; the other
    ``floor(n / 2)`` are measured. Retain (``default_rng([seed, 2_000_003, 1])``): the first items
    of its permutation, as many as the forget items attributed, are attributed, the next ones
    measured. Both sides measure the same number of items: the smallest of the held-out forget
    half, the retain items left and ``measure_limit``.
    """
    if forget_size < 2:
        raise ValueError(f"the knockout check needs at least 2 forget items (one half chooses the neurons, the other "
                         f"is measured), got {forget_size}")
    if attribute_limit is not None and attribute_limit < 1 or measure_limit is not None and measure_limit < 1:
        raise ValueError(f"item limits must be >= 1, got {attribute_limit} and {measure_limit}")
    forget = np.random.default_rng([seed, _SPLIT_STREAM, 0]).permutation(forget_size)
    half = -(-forget_size // 2)
    attributed = forget[:half][:attribute_limit]
    retain = np.random.default_rng([seed, _SPLIT_STREAM, 1]).permutation(retain_size)
    measured = min(forget_size - half, retain_size - len(attributed), measure_limit or forget_size)
    if measured < 1:
        raise ValueError(f"the knockout check attributes on {len(attributed)} retain items and measures as many "
                         f"held-out retain items as forget items: the retain split has {retain_size}")
    return HoldoutSplit(
        forget_attributed=np.sort(attributed), forget_measured=np.sort(forget[half:half + measured]),
        retain_attributed=np.sort(retain[:len(attributed)]),
        retain_measured=np.sort(retain[len(attributed):len(attributed) + measured]),
    )


def layer_widths(model: nn.Module) -> list[int]:
    """Neurons (d_ff) of every layer's MLP, in layer order."""
    return [layer.down.num_neurons for layer in ArchitectureAdapter(model).layers]


@contextmanager
def knocked_out(model: nn.Module, neurons: NeuronMask) -> Iterator[None]:
    """Inside the block, the activations of ``neurons`` are zero at every position.

    The hook zeroes the down projection's input coordinates, so the neurons' columns (rows of
    GPT-2's Conv1D) contribute nothing; every other computation is untouched.
    """
    adapter = ArchitectureAdapter(model)
    neurons.check_matches([layer.down.num_neurons for layer in adapter.layers])
    handles = []
    for layer in adapter.layers:
        indices = neurons.layer_indices(layer.index)
        if indices.numel() == 0:
            continue

        def zero_inputs(_module: nn.Module, args: tuple, indices: torch.Tensor = indices) -> tuple:
            hidden = args[0]
            # The last dim is d_ff for every layout (OPT flattens batch and positions, not d_ff).
            return (hidden.index_fill(-1, indices.to(hidden.device), 0.0), *args[1:])

        handles.append(layer.down.module.register_forward_pre_hook(zero_inputs))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mean_answer_logprobs(
    model: nn.Module, examples: Sequence[EncodedExample], pad_token_id: int, batch_size: int = 32
) -> np.ndarray:
    """Per item, the mean log-probability of its answer tokens (one forward pass over the items)."""
    return -answer_nlls(model, examples, pad_token_id, batch_size)


def top_by_score(scores: Sequence[np.ndarray], counts: Sequence[int]) -> NeuronMask:
    """Per layer, the ``counts[l]`` neurons with the highest scores (ties: lower index first)."""
    widths = [len(layer) for layer in scores]
    _check_counts(counts, widths, "top-k set")
    per_layer = []
    for layer, count in zip(scores, counts):
        chosen = np.zeros(len(layer), dtype=bool)
        chosen[np.argsort(-np.asarray(layer, dtype=np.float64), kind="stable")[:count]] = True
        per_layer.append(chosen)
    return NeuronMask.from_boolean(per_layer)


def _check_counts(counts: Sequence[int], widths: Sequence[int], what: str) -> None:
    if len(counts) != len(widths):
        raise ValueError(f"{what}: {len(counts)} per-layer counts for a model with {len(widths)} layers")
    for layer, (count, width) in enumerate(zip(counts, widths)):
        if not 0 <= count <= width:
            raise ValueError(f"{what}: {count} neurons asked in layer {layer}, which has {width}")


@dataclass(frozen=True)
class KnockoutResult:
    """Per-set rows, the summary per set kind, and the size curve."""

    sets: pd.DataFrame  # one row per (set, draw)
    summary: pd.DataFrame  # one row per set kind: means, stds, selectivity, ratio to random
    curve: pd.DataFrame  # one row per (k, selection, draw)
    forward_passes: int

    def headline(self) -> dict[str, float]:
        """The figures a run prints: per kind forget/retain drop and selectivity, and the ratio."""
        out: dict[str, float] = {}
        for row in self.summary.itertuples():
            out[f"knockout_{row.kind}_forget_drop"] = float(row.forget_drop)
            out[f"knockout_{row.kind}_retain_drop"] = float(row.retain_drop)
            out[f"knockout_{row.kind}_selectivity"] = float(row.selectivity)
        critical = self.summary.set_index("kind")
        if "critical" in critical.index:
            out["knockout_critical_over_random"] = float(critical.loc["critical", "forget_drop_over_random"])
            out["knockout_neurons"] = float(critical.loc["critical", "neurons"])
        return out


def _selectivity(forget_drop: float, retain_drop: float) -> float:
    # A retain drop of zero or below: the set spares the retain items entirely (or helps them).
    if retain_drop <= 0:
        return float("inf") if forget_drop > 0 else float("nan")
    return forget_drop / retain_drop


def knockout_check(
    model: nn.Module,
    forget: Sequence[EncodedExample],
    retain: Sequence[EncodedExample],
    pad_token_id: int,
    critical: NeuronMask,
    retain_scores: Sequence[np.ndarray] | None,
    forget_scores: Sequence[np.ndarray] | None = None,
    random_draws: int = 5,
    curve_sizes: Sequence[int] = (),
    curve_draws: int = 2,
    seed: int = 0,
    batch_size: int = 32,
) -> KnockoutResult:
    """Knock out the critical set, random sets of the same per-layer counts and the top retain
    neurons of the same counts; measure forget and retain answer log-probabilities against the
    intact model. ``curve_sizes`` (neurons per layer): top-k by ``forget_scores`` vs random k.

    Forward passes over the items: 1 (intact) + 1 + ``random_draws`` + (1 with retain scores),
    plus ``len(curve_sizes) * (1 + curve_draws)`` for the curve.
    """
    if not forget or not retain:
        raise ValueError(f"knockout needs forget and retain items (got {len(forget)} forget, {len(retain)} retain)")
    if random_draws < 1:
        raise ValueError(f"random_draws must be >= 1, got {random_draws}")
    widths = layer_widths(model)
    critical.check_matches(widths)
    counts = critical.counts()
    if sum(counts) == 0:
        raise ValueError("the critical set is empty (the threshold selects no neuron): nothing to knock out")
    if curve_sizes and forget_scores is None:
        raise ValueError("the knockout curve needs the forget scores (top-k by score)")
    for size in curve_sizes:
        if not 1 <= size <= min(widths):
            raise ValueError(f"knockout curve size {size} neurons per layer: the smallest layer has {min(widths)}")
    items = list(forget) + list(retain)
    is_forget = np.arange(len(items)) < len(forget)
    passes = 0

    def measure(neurons: NeuronMask | None) -> tuple[float, float, float, float]:
        nonlocal passes
        passes += 1
        if neurons is None:
            logprob = mean_answer_logprobs(model, items, pad_token_id, batch_size)
        else:
            with knocked_out(model, neurons):
                logprob = mean_answer_logprobs(model, items, pad_token_id, batch_size)
        return (float(logprob[is_forget].mean()), float(logprob[~is_forget].mean()),
                float(np.exp(logprob[is_forget]).mean()), float(np.exp(logprob[~is_forget]).mean()))

    intact = measure(None)

    def row(kind: str, draw: int, neurons: NeuronMask) -> dict[str, float | int | str]:
        forget_lp, retain_lp, forget_p, retain_p = measure(neurons)
        return {
            "kind": kind, "draw": draw, "neurons": neurons.total(),
            "forget_logprob": forget_lp, "retain_logprob": retain_lp,
            "forget_prob": forget_p, "retain_prob": retain_p,
            "forget_drop": intact[0] - forget_lp, "retain_drop": intact[1] - retain_lp,
            "forget_prob_drop": intact[2] - forget_p, "retain_prob_drop": intact[3] - retain_p,
        }

    rows = [{"kind": "intact", "draw": 0, "neurons": 0, "forget_logprob": intact[0], "retain_logprob": intact[1],
             "forget_prob": intact[2], "retain_prob": intact[3], "forget_drop": 0.0, "retain_drop": 0.0,
             "forget_prob_drop": 0.0, "retain_prob_drop": 0.0}]
    rows.append(row("critical", 0, critical))
    for draw in range(random_draws):
        rows.append(row("random", draw, random_neurons(counts, widths, np.random.default_rng([seed, draw]))))
    if retain_scores is not None:
        rows.append(row("retain_critical", 0, top_by_score(retain_scores, counts)))
    sets = pd.DataFrame(rows)

    curve_rows = []
    for size in curve_sizes:
        layer_counts = [size] * len(widths)
        top = row("top_forget_score", 0, top_by_score(forget_scores, layer_counts))
        curve_rows.append({**top, "k": size})
        for draw in range(curve_draws):
            rng = np.random.default_rng([seed, 1_000_003, size, draw])
            curve_rows.append({**row("random", draw, random_neurons(layer_counts, widths, rng)), "k": size})
    curve = pd.DataFrame(curve_rows)
    return KnockoutResult(sets=sets, summary=summarise(sets), curve=curve, forward_passes=passes)


def summarise(sets: pd.DataFrame) -> pd.DataFrame:
    """One row per set kind: mean (and std over draws) of the drops, selectivity of the mean
    drops, and the kind's forget drop over the random sets' mean forget drop."""
    measured = sets[sets["kind"] != "intact"]
    columns = ["forget_drop", "retain_drop", "forget_prob_drop", "retain_prob_drop"]
    grouped = measured.groupby("kind", sort=False)
    summary = grouped[columns].mean()
    spread = grouped[columns].std(ddof=1).fillna(0.0).add_suffix("_std")
    summary = summary.join(spread)
    summary["draws"] = grouped.size()
    summary["neurons"] = grouped["neurons"].first()
    summary["selectivity"] = [_selectivity(f, r) for f, r in zip(summary["forget_drop"], summary["retain_drop"])]
    random_drop = float(summary.loc["random", "forget_drop"]) if "random" in summary.index else float("nan")
    summary["forget_drop_over_random"] = [
        (drop / random_drop) if random_drop > 0 else (float("inf") if drop > 0 else float("nan"))
        for drop in summary["forget_drop"]
    ]
    return summary.reset_index()


def knockout_sets_from_mask_table(table: pd.DataFrame, variant: str) -> NeuronMask:
    """The critical set of a mask table (``threshold_mask``'s ``mask.parquet``) for a variant:
    include = C_f, exclude = C_f minus C_r, only = C_f and C_r (independent of the mask rule, so a
    ``random`` mask is compared against the critical neurons it stands in for)."""
    forget = table["critical_forget"].to_numpy(dtype=bool)
    retain = table["critical_retain"].to_numpy(dtype=bool)
    chosen = {"include": forget, "exclude": forget & ~retain, "only": forget & retain}.get(variant)
    if chosen is None:
        raise ValueError(f"mask variant must be one of ['include', 'exclude', 'only'], got {variant!r}")
    return NeuronMask.from_table(table.assign(in_mask=chosen))


def format_summary(summary: pd.DataFrame) -> list[str]:
    """Text lines of the knockout summary (one per set kind) for the run's printout."""
    lines = ["knockout (zeroed activations; drop of mean answer log-prob, nats/token):",
             f"  {'set':<16}{'neurons':>8}{'forget drop':>22}{'retain drop':>22}{'selectivity':>13}"]
    for row in summary.itertuples():
        lines.append(
            f"  {row.kind:<16}{int(row.neurons):>8}{_pm(row.forget_drop, row.forget_drop_std):>22}"
            f"{_pm(row.retain_drop, row.retain_drop_std):>22}{row.selectivity:>13.3g}"
        )
    critical = summary.set_index("kind")
    if {"critical", "random"} <= set(critical.index):
        lines.append(f"  critical / random on the forget drop: {critical.loc['critical', 'forget_drop_over_random']:.3g}")
    return lines


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if std > 0 else f"{mean:.4f}"
