"""Unlearning objectives on answer tokens only: gradient ascent, GradDiff, NPO and SimNPO.

Every objective is ``gamma_f * forget_term + alpha_r * retain_term`` and is MINIMISED:

- ``ga`` forget term: ``-CE(forget)`` (gradient ascent on the forget answers).
- ``npo`` forget term (Zhang et al. 2024): ``-(2/beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))``
  with sequence log-probabilities summed over answer tokens and ``p_ref`` a frozen reference
  (the model before unlearning).
- ``simnpo`` forget term (Fan et al. 2024): ``-(2/beta) * mean log sigmoid(-(beta/|y|) log p(y|x) - gamma)``:
  length-normalised and reference-free. Its beta is its own (``simnpo_beta``, default 4.5 as in
  open-unlearning), not NPO's: at NPO's 0.1 the weight ``sigmoid`` puts on a sequence stays in
  [0.76, 1.0] and SimNPO is length-normalised gradient ascent.
- retain term ``nll``: ``CE(retain)`` (GradDiff); ``kl``: ``KL(p_ref || p)`` per answer position,
  averaged over positions, against the frozen reference.

"Answer tokens" are the labelled positions of :mod:`simu_core.prompting` examples (labels are
IGNORE_INDEX on the prompt), shifted by one as in :func:`simu_core.scoring.token_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simu_core.prompting import IGNORE_INDEX
from simu_core.scoring import answer_loss, token_logprobs

FORGET_LOSSES = ("ga", "npo", "simnpo")
RETAIN_LOSSES = ("nll", "kl")

__all__ = [
    "FORGET_LOSSES",
    "RETAIN_LOSSES",
    "UnlearningObjective",
    "answer_nll",
    "gradient_ascent_loss",
    "kl_to_reference",
    "npo_loss",
    "sequence_logprobs",
    "simnpo_loss",
]


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the batch (token-weighted)."""
    return answer_loss(logits, labels)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed answer-token log-probability [B] and the answer length [B]."""
    logprobs, mask = token_logprobs(logits, labels)
    return logprobs.sum(-1), mask.sum(-1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-CE`` on the forget answers: minimising it raises their loss."""
    return -answer_nll(logits, labels)


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation against a frozen reference (sequence-level log-ratio)."""
    logp, _ = sequence_logprobs(logits, labels)
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(reference_logits.detach(), labels)
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO: NPO without a reference, on the length-normalised log-probability, with margin gamma."""
    logp, length = sequence_logprobs(logits, labels)
    # clamp: a sequence whose answer was cut away entirely contributes log sigmoid(-gamma), not NaN.
    mean_logp = logp / length.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma).mean()


def kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p)`` at each answer position (the positions that predict answer tokens), averaged."""
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference_logits[:, :-1].detach().float(), dim=-1)[mask]
    if logp.shape[0] == 0:
        return logits.sum() * 0.0  # keeps the graph (and a zero gradient) for an answer-less batch
    return F.kl_div(logp, ref_logp, reduction="batchmean", log_target=True)


@dataclass(frozen=True)
class UnlearningObjective:
    """``forget_weight * forget_term + retain_weight * retain_term`` (``retain=None``: forget only)."""

    forget: str = "ga"
    retain: str | None = "nll"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.forget not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget!r}; known: {list(FORGET_LOSSES)}")
        if self.retain is not None and self.retain not in RETAIN_LOSSES:
            raise ValueError(f"unknown retain loss {self.retain!r}; known: {list(RETAIN_LOSSES)} or None")
        if self.forget_weight < 0 or self.retain_weight < 0:
            raise ValueError(
                f"forget_weight and retain_weight must be >= 0, got {self.forget_weight} and {self.retain_weight}"
            )
        if self.npo_beta <= 0:
            raise ValueError(f"npo_beta must be > 0, got {self.npo_beta}")
        if self.simnpo_beta <= 0:
            raise ValueError(f"simnpo_beta must be > 0, got {self.simnpo_beta}")

    @property
    def uses_retain(self) -> bool:
        """Whether a retain batch takes part in the loss (a zero weight skips its forward pass)."""
        return self.retain is not None and self.retain_weight > 0

    @property
    def forget_needs_reference(self) -> bool:
        return self.forget == "npo"

    @property
    def retain_needs_reference(self) -> bool:
        return self.uses_retain and self.retain == "kl"

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be supplied."""
        return self.forget_needs_reference or self.retain_needs_reference

    def forget_term(
        self, logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The unweighted forget term (to be minimised)."""
        if self.forget == "ga":
            return gradient_ascent_loss(logits, labels)
        if self.forget == "npo":
            if reference_logits is None:
                raise ValueError("the npo forget loss needs reference logits")
            return npo_loss(logits, labels, reference_logits, self.npo_beta)
        return simnpo_loss(logits, labels, self.simnpo_beta, self.simnpo_gamma)

    def retain_term(
        self, logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The unweighted retain term (to be minimised)."""
        if self.retain == "kl":
            if reference_logits is None:
                raise ValueError("the kl retain loss needs reference logits")
            return kl_to_reference(logits, labels, reference_logits)
        if self.retain == "nll":
            return answer_nll(logits, labels)
        raise ValueError("this objective has no retain term")
