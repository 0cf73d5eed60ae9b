"""Batched teacher-forced scoring: per-item answer NLLs and, where a metric needs them, per-token
log-probs, vocabulary moments (Min-K%++) and argmax matches (extraction strength).

All variants of all items (answers, paraphrases, perturbed answers, options) are flattened into one
list and scored in a single pass sorted by length, so padding is minimal and batches stay full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from simu_core.metrics.mia import MIN_KPP_VARIANCE_FLOOR
from simu_core.prompting import IGNORE_INDEX, EncodedExample, collate


@dataclass
class ScoredExamples:
    """Scores of a list of examples, in the input order.

    ``nll`` and ``num_tokens`` hold one value per example. The per-token lists hold, for examples
    scored with ``token_stats``, one array per labelled token (None otherwise):
    ``token_logprobs`` (log p of the label), ``vocab_mean`` / ``vocab_std`` (mean and std of log p
    over the vocabulary at that position) and ``argmax_match`` (greedy prediction == label).
    """

    nll: np.ndarray
    num_tokens: np.ndarray
    token_logprobs: list[np.ndarray | None] = field(default_factory=list)
    vocab_mean: list[np.ndarray | None] = field(default_factory=list)
    vocab_std: list[np.ndarray | None] = field(default_factory=list)
    argmax_match: list[np.ndarray | None] = field(default_factory=list)

    @property
    def sum_logprob(self) -> np.ndarray:
        """Summed log-probability of each example's labelled tokens."""
        return -self.nll * self.num_tokens


def _token_stats_flags(token_stats: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(token_stats, bool):
        return [token_stats] * count
    flags = [bool(flag) for flag in token_stats]
    if len(flags) != count:
        raise ValueError(f"token_stats has {len(flags)} flags for {count} examples")
    return flags


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    batch_size: int = 16,
    token_stats: bool | Sequence[bool] = False,
) -> ScoredExamples:
    """Mean labelled-token NLL of every example (batched, right-padded, sorted by length).

    ``token_stats`` (one flag, or one per example) also returns per-token log-probs, vocabulary
    moments and argmax matches for the flagged examples.
    """
    if not examples:
        raise ValueError("score_examples needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for index, example in enumerate(examples):
        # Position 0 is never predicted, so a label there alone would score nothing.
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            raise ValueError(f"example {index} has no labelled token to score")
    flags = _token_stats_flags(token_stats, len(examples))
    device = next(model.parameters()).device
    count = len(examples)
    nll = np.empty(count, dtype=np.float64)
    num_tokens = np.empty(count, dtype=np.int64)
    per_token: dict[str, list[np.ndarray | None]] = {
        key: [None] * count for key in ("token_logprobs", "vocab_mean", "vocab_std", "argmax_match")
    }
    # Longest first: an out-of-memory error shows up on the first batch, not after minutes.
    order = sorted(range(count), key=lambda index: -len(examples[index].input_ids))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([examples[index] for index in chunk], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            logprobs_all = torch.log_softmax(logits, dim=-1)
            logprobs = logprobs_all.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
            counts = mask.sum(-1)
            item_nll = -(logprobs * mask).sum(-1) / counts
            nll[chunk] = item_nll.double().cpu().numpy()
            num_tokens[chunk] = counts.cpu().numpy()
            for row, index in enumerate(chunk):
                if not flags[index]:
                    continue
                # Moments only for flagged rows: a full pass over the vocabulary per position.
                positions = mask[row]
                # float64 and the centred form: E[x^2] - E[x]^2 in float32 loses ~1e-4 of a small
                # variance to cancellation (mean ~ -log V), enough to move Min-K%++ scores.
                row_logprobs = logprobs_all[row, positions].double()
                probs = row_logprobs.exp()
                mean = (probs * row_logprobs).sum(-1)
                variance = (probs * (row_logprobs - mean.unsqueeze(-1)).square()).sum(-1)
                std = variance.clamp(min=MIN_KPP_VARIANCE_FLOOR).sqrt()
                matches = logits[row, positions].argmax(-1) == labels[row, positions]
                per_token["token_logprobs"][index] = logprobs[row, positions].double().cpu().numpy()
                per_token["vocab_mean"][index] = mean.double().cpu().numpy()
                per_token["vocab_std"][index] = std.double().cpu().numpy()
                per_token["argmax_match"][index] = matches.cpu().numpy()
    finally:
        model.train(was_training)
    return ScoredExamples(nll=nll, num_tokens=num_tokens, **per_token)
