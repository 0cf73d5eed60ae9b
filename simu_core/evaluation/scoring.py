"""Batched teacher-forced scoring: per-item answer NLLs and, where a metric needs them, per-token
log-probs, vocabulary moments (Min-K%++) and argmax matches (extraction strength).

All variants of all items (answers, paraphrases, perturbed answers, options) are flattened into one
list and scored in batches sorted by length, so padding is minimal and batches stay full.

With ``share_prompts`` the examples that start with the same unlabelled prompt (a TOFU question
with its answer, paraphrase and 5 perturbed answers) are scored from one prompt pass: the prompt
runs once (left-padded, explicit position ids) and its key/value cache is replicated for every
continuation, which then runs right-padded on top of it. That is the same computation with the
prompt tokens evaluated once instead of once per variant (numbers equal to float rounding).
"""

from __future__ import annotations

import inspect
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


class _Collector:
    """Receives per-batch predictions and fills the per-example outputs."""

    def __init__(self, count: int, flags: list[bool]) -> None:
        self.flags = flags
        self.nll = np.empty(count, dtype=np.float64)
        self.num_tokens = np.empty(count, dtype=np.int64)
        self.per_token: dict[str, list[np.ndarray | None]] = {
            key: [None] * count for key in ("token_logprobs", "vocab_mean", "vocab_std", "argmax_match")
        }

    def add(self, logits: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]) -> None:
        """``logits[r, t]`` predicts ``labels[r, t]`` (IGNORE_INDEX where unscored) for example ``indices[r]``."""
        logits = logits.float()
        mask = labels != IGNORE_INDEX
        logprobs_all = torch.log_softmax(logits, dim=-1)
        logprobs = logprobs_all.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        counts = mask.sum(-1)
        self.nll[list(indices)] = (-(logprobs * mask).sum(-1) / counts).double().cpu().numpy()
        self.num_tokens[list(indices)] = counts.cpu().numpy()
        for row, index in enumerate(indices):
            if not self.flags[index]:
                continue
            positions = mask[row]
            # float64 and the centred form: E[x^2] - E[x]^2 in float32 loses ~1e-4 of a small
            # variance to cancellation (mean ~ -log V), enough to move Min-K%++ scores.
            row_logprobs = logprobs_all[row, positions].double()
            probs = row_logprobs.exp()
            mean = (probs * row_logprobs).sum(-1)
            variance = (probs * (row_logprobs - mean.unsqueeze(-1)).square()).sum(-1)
            std = variance.clamp(min=MIN_KPP_VARIANCE_FLOOR).sqrt()
            matches = logits[row, positions].argmax(-1) == labels[row, positions]
            self.per_token["token_logprobs"][index] = logprobs[row, positions].double().cpu().numpy()
            self.per_token["vocab_mean"][index] = mean.cpu().numpy()
            self.per_token["vocab_std"][index] = std.cpu().numpy()
            self.per_token["argmax_match"][index] = matches.cpu().numpy()

    def result(self) -> ScoredExamples:
        return ScoredExamples(nll=self.nll, num_tokens=self.num_tokens, **self.per_token)


def _token_stats_flags(token_stats: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(token_stats, bool):
        return [token_stats] * count
    flags = [bool(flag) for flag in token_stats]
    if len(flags) != count:
        raise ValueError(f"token_stats has {len(flags)} flags for {count} examples")
    return flags


def _prompt_length(example: EncodedExample) -> int:
    """Number of leading unlabelled tokens (the prompt)."""
    for position, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return position
    return len(example.labels)


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _score_plain(model, examples, pad_token_id, batch_size, collector, device) -> None:
    # Longest first: an out-of-memory error shows up on the first batch, not after minutes.
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([examples[index] for index in chunk], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        collector.add(logits[:, :-1], batch["labels"][:, 1:], chunk)


def _score_shared(model, examples, pad_token_id, batch_size, collector, device) -> None:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(tuple(example.input_ids[: _prompt_length(example)]), []).append(index)
    # Longest prompts first, then longest continuations: similar widths share a batch.
    ordered = sorted(
        groups.items(),
        key=lambda item: (-len(item[0]), -max(len(examples[i].input_ids) for i in item[1])),
    )
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # transformers 5 renames the cache argument ``past_key_values`` -> ``cache``.
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"
    start = 0
    while start < len(ordered):
        # Whole prompt groups per batch, up to batch_size continuation rows (at least one group).
        stop, rows = start, 0
        while stop < len(ordered) and (stop == start or rows + len(ordered[stop][1]) <= batch_size):
            rows += len(ordered[stop][1])
            stop += 1
        batch_groups = ordered[start:stop]
        start = stop

        prompt_width = max(len(prompt) for prompt, _ in batch_groups)
        prompt_ids = torch.full((len(batch_groups), prompt_width), pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch_groups), prompt_width), dtype=torch.long)
        for row, (prompt, _) in enumerate(batch_groups):
            prompt_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[row, prompt_width - len(prompt) :] = 1
        # Left padding puts every prompt's last token in the last column; explicit position ids
        # keep the real tokens at positions 0..n-1 as in the unpadded sequence.
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prompt_out = model(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            position_ids=prompt_positions.to(device),
            use_cache=True,
            **keep_last,
        )
        # The last prompt position predicts the first continuation token.
        first_logits = prompt_out.logits[:, -1]

        indices, owners = [], []
        for group, (_, members) in enumerate(batch_groups):
            indices.extend(members)
            owners.extend([group] * len(members))
        owner = torch.tensor(owners)
        # Continuations: everything after the shared prompt, right-padded.
        starts = [len(batch_groups[group][0]) for group in owners]
        width = max(len(examples[index].input_ids) - offset for index, offset in zip(indices, starts))
        input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, (index, start_at) in enumerate(zip(indices, starts)):
            tokens = examples[index].input_ids[start_at:]
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(tokens)] = torch.tensor(examples[index].labels[start_at:])
            mask[row, : len(tokens)] = 1
        cache = getattr(prompt_out, "cache", None)
        if cache is None:
            cache = prompt_out.past_key_values
        # One copy of the prompt's keys/values per continuation (beam search's reordering API).
        cache.reorder_cache(owner.to(device))
        positions = prompt_mask.sum(-1)[owner].unsqueeze(-1) + torch.arange(width).unsqueeze(0)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=torch.cat([prompt_mask[owner], mask], dim=-1).to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_argument: cache},
        ).logits
        predictions = torch.cat([first_logits[owner.to(device)].unsqueeze(1), logits[:, :-1]], dim=1)
        collector.add(predictions, labels.to(device), indices)


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    batch_size: int = 16,
    token_stats: bool | Sequence[bool] = False,
    share_prompts: bool = False,
) -> ScoredExamples:
    """Mean labelled-token NLL of every example (batched, sorted by length, input order kept).

    ``token_stats`` (one flag, or one per example) also returns per-token log-probs, vocabulary
    moments and argmax matches for the flagged examples. ``share_prompts`` runs each distinct
    prompt once for all examples that continue it (every example needs a non-empty prompt).
    """
    if not examples:
        raise ValueError("score_examples needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for index, example in enumerate(examples):
        # Position 0 is never predicted, so a label there alone would score nothing.
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            raise ValueError(f"example {index} has no labelled token to score")
        if share_prompts and _prompt_length(example) == 0:
            raise ValueError(f"example {index} has no unlabelled prompt to share (use share_prompts=False)")
    collector = _Collector(len(examples), _token_stats_flags(token_stats, len(examples)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        score = _score_shared if share_prompts else _score_plain
        score(model, examples, pad_token_id, batch_size, collector, device)
    finally:
        model.train(was_training)
    return collector.result()
