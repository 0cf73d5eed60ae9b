"""The minimised objective of a run: ``forget_weight * forget_term + retain_weight * retain_term``.

The terms are the formulas of :mod:`simu_core.unlearning.losses`; this module says which inputs each
loss reads, so that the trainer runs only the forward passes a loss needs:

| loss                  | forget term reads                                        | retain term |
|-----------------------|----------------------------------------------------------|-------------|
| ga, ceu               | forget logits                                            | none        |
| graddiff, wga, satimp, pdu | forget logits                                       | nll or kl   |
| npo                   | forget logits + the frozen reference's                   | nll or kl   |
| undial                | forget logits + the frozen reference's                   | none        |
| simnpo                | forget logits                                            | nll or kl   |
| dpo, idk_dpo, altpo   | forget and preferred-answer logits + the reference's     | nll or kl   |
| rmu                   | the hidden state after decoder layer ``rmu_layer``       | that hidden state against the reference's (its own) |

PDU's retain weight is a dual variable: the trainer starts it at ``retain_weight`` and moves it after
every step (:func:`~simu_core.unlearning.losses.pdu_dual_update`); the retain term is shifted by
``pdu_retain_eps``, the constraint's level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simu_core.method_names import PREFERENCE_LOSSES
from simu_core.unlearning import losses

FORGET_LOSSES = ("ga", "npo", "simnpo", "dpo", "idk_dpo", "altpo", "rmu", "undial", "wga", "satimp", "ceu", "pdu")
RETAIN_LOSSES = ("nll", "kl")
# How each forget term averages over a batch: split over processes, each process's share is its part of
# these units ("tokens": answer tokens; "sequences": items).
_UNITS = {"npo": "sequences", "simnpo": "sequences", "dpo": "sequences", "idk_dpo": "sequences",
          "altpo": "sequences", "rmu": "sequences"}

__all__ = ["FORGET_LOSSES", "PREFERENCE_LOSSES", "RETAIN_LOSSES", "ForgetInputs", "RetainInputs",
           "UnlearningObjective"]


@dataclass
class ForgetInputs:
    """What a forget term may read for one forget batch (None where the loss does not need it)."""

    logits: torch.Tensor
    labels: torch.Tensor
    reference_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # after decoder layer ``rmu_layer`` (rmu)
    control_vector: torch.Tensor | None = None  # rmu's fixed random direction
    preferred_logits: torch.Tensor | None = None  # the preferred answers of the same questions
    preferred_labels: torch.Tensor | None = None
    reference_preferred_logits: torch.Tensor | None = None


@dataclass
class RetainInputs:
    """What a retain term may read for one retain batch."""

    logits: torch.Tensor
    labels: torch.Tensor
    reference_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    reference_hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class UnlearningObjective:
    """``forget_weight * forget_term + retain_weight * retain_term`` (``retain=None``: forget only).

    Hyper-parameters default to open-unlearning's (``configs/trainer/<Method>.yaml``; see
    :class:`simu_core.config.UnlearnConfig`).
    """

    forget: str = "ga"
    retain: str | None = "nll"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_gamma: float = 0.0
    dpo_beta: float = 0.1
    undial_beta: float = 10.0
    wga_beta: float = 1.0
    satimp_beta1: float = 5.0
    satimp_beta2: float = 1.0
    ceu_ignore_first: int = 1
    pdu_retain_eps: float = 0.0
    pdu_dual_step: float = 1.0
    rmu_layer: int = 7
    rmu_steering_coeff: float = 300.0

    def __post_init__(self) -> None:
        if self.forget not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget!r}; known: {list(FORGET_LOSSES)}")
        if self.retain is not None and self.retain not in RETAIN_LOSSES:
            raise ValueError(f"unknown retain loss {self.retain!r}; known: {list(RETAIN_LOSSES)} or None")
        if self.forget_weight < 0 or self.retain_weight < 0:
            raise ValueError(
                f"forget_weight and retain_weight must be >= 0, got {self.forget_weight} and {self.retain_weight}"
            )
        for name in ("npo_beta", "simnpo_beta", "dpo_beta", "undial_beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    # ------------------------------------------------------------------------- what it reads

    @property
    def uses_retain(self) -> bool:
        """Whether a retain batch takes part in the loss (a zero weight skips its forward pass, except
        PDU's: its dual variable can grow from 0)."""
        return self.retain is not None and (self.retain_weight > 0 or self.forget == "pdu")

    @property
    def forget_needs_reference(self) -> bool:
        return self.forget in ("npo", "undial", *PREFERENCE_LOSSES)

    @property
    def retain_needs_reference(self) -> bool:
        return self.uses_retain and (self.retain == "kl" or self.forget == "rmu")

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be supplied."""
        return self.forget_needs_reference or self.retain_needs_reference

    @property
    def needs_preferred(self) -> bool:
        """Whether each forget item needs a preferred answer (the preference losses)."""
        return self.forget in PREFERENCE_LOSSES

    @property
    def hidden_layer(self) -> int | None:
        """The decoder layer whose output the loss reads (rmu), else None."""
        return self.rmu_layer if self.forget == "rmu" else None

    @property
    def forget_units(self) -> str:
        """What the forget term averages over: "tokens" or "sequences"."""
        return _UNITS.get(self.forget, "tokens")

    @property
    def forget_skipped_tokens(self) -> int:
        """Leading answer tokens of each item the forget term leaves out (CE-U's first n)."""
        return self.ceu_ignore_first if self.forget == "ceu" else 0

    @property
    def has_dual(self) -> bool:
        """Whether the retain weight is a dual variable moved after every step (pdu)."""
        return self.forget == "pdu" and self.uses_retain

    # --------------------------------------------------------------------------------- terms

    def forget_term(self, inputs: ForgetInputs) -> torch.Tensor:
        """The unweighted forget term (to be minimised)."""
        logits, labels = inputs.logits, inputs.labels
        if self.forget_needs_reference and inputs.reference_logits is None:
            raise ValueError(f"the {self.forget} forget loss needs reference logits")
        if self.forget == "ga":
            return losses.gradient_ascent_loss(logits, labels)
        if self.forget == "npo":
            return losses.npo_loss(logits, labels, inputs.reference_logits, self.npo_beta)
        if self.forget == "simnpo":
            return losses.simnpo_loss(logits, labels, self.simnpo_beta, self.simnpo_gamma)
        if self.forget in PREFERENCE_LOSSES:
            if inputs.preferred_logits is None or inputs.reference_preferred_logits is None:
                raise ValueError(f"the {self.forget} loss needs the preferred answers' logits and the reference's")
            pair = (inputs.preferred_logits, inputs.preferred_labels, logits, labels,
                    inputs.reference_preferred_logits, inputs.reference_logits)
            if self.forget == "altpo":  # DPO toward the model's own alternates
                return losses.altpo_loss(*pair, beta=self.dpo_beta)
            return losses.dpo_loss(*pair, beta=self.dpo_beta)
        if self.forget == "rmu":
            if inputs.hidden is None or inputs.control_vector is None:
                raise ValueError("the rmu loss needs the hidden state of unlearn.rmu_layer and its control vector")
            target = inputs.control_vector.to(inputs.hidden.dtype).expand_as(inputs.hidden)
            return losses.activation_mse(inputs.hidden, target, losses.rmu_answer_mask(labels))
        if self.forget == "undial":
            return losses.undial_loss(logits, labels, inputs.reference_logits, self.undial_beta)
        if self.forget == "wga":
            return losses.wga_loss(logits, labels, self.wga_beta)
        if self.forget == "satimp":
            return losses.satimp_loss(logits, labels, self.satimp_beta1, self.satimp_beta2)
        if self.forget == "ceu":
            return losses.ceu_loss(logits, labels, self.ceu_ignore_first)
        return losses.pdu_forget_loss(logits, labels)

    def retain_term(self, inputs: RetainInputs) -> torch.Tensor:
        """The unweighted retain term (to be minimised); for pdu, before the ``pdu_retain_eps`` shift."""
        if self.retain is None:
            raise ValueError("this objective has no retain term")
        if self.forget == "rmu":
            if inputs.hidden is None or inputs.reference_hidden is None:
                raise ValueError("the rmu retain term needs the hidden states of the model and of the reference")
            return losses.activation_mse(inputs.hidden, inputs.reference_hidden.detach(),
                                         losses.rmu_answer_mask(inputs.labels))
        if self.retain == "kl":
            if inputs.reference_logits is None:
                raise ValueError("the kl retain loss needs reference logits")
            return losses.kl_to_reference(inputs.logits, inputs.labels, inputs.reference_logits)
        return losses.answer_nll(inputs.logits, inputs.labels)

    def total(self, forget_term: float, retain_term: float, retain_weight: float | None = None) -> float:
        """The objective's value from its terms (``retain_weight``: PDU's current dual variable)."""
        if not self.uses_retain:
            return self.forget_weight * forget_term
        weight = self.retain_weight if retain_weight is None else retain_weight
        shift = self.pdu_retain_eps if self.forget == "pdu" else 0.0
        return self.forget_weight * forget_term + weight * (retain_term - shift)
