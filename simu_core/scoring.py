"""Batched per-item answer NLLs: the building block of training checks and evaluation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from simu_core.prompting import IGNORE_INDEX, EncodedExample, collate


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next-token labels and the mask of labelled positions.

    ``logits`` [B, T, V] and ``labels`` [B, T] (IGNORE_INDEX where unlabelled); returns two
    [B, T-1] tensors, shifted so that position t scores token t+1.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    safe_labels = shifted_labels.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(shifted_logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all labelled tokens of the batch (the fine-tuning loss)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def answer_nlls(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    batch_size: int = 32,
) -> np.ndarray:
    """Mean answer-token NLL of every example (batched, in the input order)."""
    if not examples:
        raise ValueError("answer_nlls needs at least one example")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
    nlls = np.empty(len(examples), dtype=np.float64)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([examples[index] for index in chunk], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs, mask = token_logprobs(logits, batch["labels"])
        per_item = -(logprobs.sum(-1) / mask.sum(-1).clamp(min=1))
        nlls[chunk] = per_item.double().cpu().numpy()
    model.train(was_training)
    return nlls


def answer_probabilities(
    model: torch.nn.Module, examples: Sequence[EncodedExample], pad_token_id: int, batch_size: int = 32
) -> np.ndarray:
    """Length-normalised answer probability exp(-mean NLL) of every example."""
    return np.exp(-answer_nlls(model, examples, pad_token_id, batch_size))
