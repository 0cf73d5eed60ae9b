"""Unlearning methods by name: loss, optimizer and trainable set (SIMU step 2 and its baselines).

| name          | forget loss | retain term | optimizer | trainable                                   |
|---------------|-------------|-------------|-----------|---------------------------------------------|
| ``ga``        | GA          | none        | AdamW     | all parameters                              |
| ``fo_graddiff``| GA         | nll / kl    | AdamW     | all parameters                              |
| ``so_graddiff``| GA         | nll / kl    | Sophia    | all parameters                              |
| ``simu``      | GA          | nll / kl    | Sophia    | attention + critical down-projection columns|
| ``npo``       | NPO         | nll / kl    | AdamW     | all parameters                              |
| ``so_npo``    | NPO         | nll / kl    | Sophia    | all parameters                              |
| ``simu_npo``  | NPO         | nll / kl    | Sophia    | attention + critical down-projection columns|
| ``simnpo``    | SimNPO      | nll / kl    | AdamW     | all parameters                              |

The retain term follows ``unlearn.retain_loss`` (``nll``: GradDiff; ``kl``: KL to the frozen
reference) and ``unlearn.retain_weight`` (0 turns it off). SIMU-scope methods train every attention
projection in full (unless ``train_attention`` is off, for ablations) and, in each MLP down
projection, only the columns of the critical neurons (compact Sophia state via ``ColumnMask``);
everything else, down-projection biases included, is frozen. Sophia's Hessian estimate is
``unlearn.hessian``: ``gnb`` or ``soul`` (see :class:`~simu_core.unlearning.trainer.SophiaUnlearningTrainer`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from simu_core.config import UnlearnConfig
from simu_core.masking import NeuronMask
from simu_core.models.adapter import ArchitectureAdapter
from simu_core.optim import ColumnMask
from simu_core.prompting import EncodedExample
from simu_core.unlearning.losses import UnlearningObjective
from simu_core.unlearning.trainer import (
    HESSIAN_VARIANTS,
    AdamWUnlearningTrainer,
    ProgressCallback,
    SophiaUnlearningTrainer,
    Trainable,
    UnlearningResult,
    UnlearningTrainer,
)

if TYPE_CHECKING:
    from simu_core.distributed import DistributedContext
    from simu_core.stopping import ForgetMonitor

__all__ = [
    "METHODS",
    "MethodSpec",
    "build_objective",
    "build_trainer",
    "frozen_reference",
    "get_method",
    "run_unlearning",
    "select_trainables",
    "validate_unlearning",
]


@dataclass(frozen=True)
class MethodSpec:
    """What a method name means: forget loss, whether a retain term is used, optimizer, scope."""

    name: str
    forget_loss: str  # "ga" | "npo" | "simnpo"
    uses_retain: bool
    optimizer: str  # "adamw" | "sophia"
    scope: str  # "all" | "simu"
    description: str

    @property
    def needs_mask(self) -> bool:
        """Whether the method reads the critical-neuron mask."""
        return self.scope == "simu"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("ga", "ga", False, "adamw", "all", "gradient ascent on the forget set, AdamW"),
        MethodSpec("fo_graddiff", "ga", True, "adamw", "all", "FO-GradDiff: gradient difference, AdamW"),
        MethodSpec("so_graddiff", "ga", True, "sophia", "all", "SO-GradDiff (SOUL): gradient difference, Sophia"),
        MethodSpec("simu", "ga", True, "sophia", "simu", "SIMU: SO-GradDiff on attention + critical neurons"),
        MethodSpec("npo", "npo", True, "adamw", "all", "NPO with a retain term, AdamW"),
        MethodSpec("so_npo", "npo", True, "sophia", "all", "NPO with a retain term, Sophia"),
        MethodSpec("simu_npo", "npo", True, "sophia", "simu", "SIMU-NPO: SO-NPO on attention + critical neurons"),
        MethodSpec("simnpo", "simnpo", True, "adamw", "all", "SimNPO with a retain term, AdamW"),
    )
}


def get_method(name: str) -> MethodSpec:
    """The method registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def _is_decayed(name: str, param: nn.Parameter) -> bool:
    # As Hugging Face's Trainer: no weight decay on biases and normalisation weights.
    return param.ndim >= 2 and "norm" not in name.lower()


def validate_unlearning(config: UnlearnConfig, model: nn.Module, mask: NeuronMask | None = None) -> MethodSpec:
    """Check a run's inputs before any training; returns the method. Raises ValueError naming the problem."""
    spec = get_method(config.method)
    if not config.lr > 0:
        raise ValueError(f"unlearn.lr must be > 0, got {config.lr}")
    if spec.optimizer == "sophia" and config.hessian not in HESSIAN_VARIANTS:
        raise ValueError(f"unknown unlearn.hessian {config.hessian!r}; known: {list(HESSIAN_VARIANTS)}")
    if spec.needs_mask:
        if mask is None:
            raise ValueError(f"method {spec.name!r} needs a critical-neuron mask (none was given)")
        mask.check_matches(ArchitectureAdapter(model).neurons_per_layer())
        if mask.total() == 0 and not config.train_attention:
            raise ValueError(
                f"method {spec.name!r}: the critical-neuron mask is empty and unlearn.train_attention is off, "
                "so nothing would be trained (lower mask.threshold or turn train_attention on)"
            )
    return spec


def select_trainables(
    model: nn.Module, spec: MethodSpec, mask: NeuronMask | None = None, train_attention: bool = True
) -> list[Trainable]:
    """The parameters (and per-parameter masks) a method updates."""
    if spec.scope == "all":
        return [Trainable(name, p, None, _is_decayed(name, p)) for name, p in model.named_parameters()]
    if mask is None:
        raise ValueError(f"method {spec.name!r} needs a critical-neuron mask")
    adapter = ArchitectureAdapter(model)
    mask.check_matches(adapter.neurons_per_layer())
    trainables: list[Trainable] = []
    if train_attention:
        trainables += [Trainable(name, p, None, _is_decayed(name, p)) for name, p in adapter.attention_parameters()]
    for down in adapter.down_projections():
        indices = mask.layer_indices(down.layer)
        if indices.numel():  # a layer without critical neurons keeps its down projection frozen
            trainables.append(Trainable(f"{down.name}.weight", down.weight, ColumnMask(down.neuron_dim, indices)))
    return trainables


def build_objective(config: UnlearnConfig, spec: MethodSpec | None = None) -> UnlearningObjective:
    """The loss of a method with the config's weights and NPO/SimNPO settings."""
    spec = spec or get_method(config.method)
    return UnlearningObjective(
        forget=spec.forget_loss,
        retain=config.retain_loss if spec.uses_retain else None,
        forget_weight=config.forget_weight,
        retain_weight=config.retain_weight if spec.uses_retain else 0.0,
        npo_beta=config.npo_beta,
        simnpo_beta=config.simnpo_beta,
        simnpo_gamma=config.simnpo_gamma,
    )


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` as it is now (NPO's and the KL retain loss's reference)."""
    reference = copy.deepcopy(model)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def build_trainer(
    model: nn.Module,
    forget_examples: Sequence[EncodedExample],
    retain_examples: Sequence[EncodedExample],
    config: UnlearnConfig,
    *,
    pad_token_id: int,
    mask: NeuronMask | None = None,
    reference: nn.Module | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    progress_callback: ProgressCallback | None = None,
    fail_at_step: int | None = None,
    distributed: DistributedContext | None = None,
    monitor: ForgetMonitor | None = None,
) -> UnlearningTrainer:
    """Validate the inputs and build the trainer of ``config.method``.

    ``reference``: the frozen model NPO and the KL retain loss compare against; when the objective
    needs one and none is given, a frozen copy of ``model`` as it is before unlearning is taken.
    ``distributed``: shard ``model`` (and the reference) with FSDP over this process group once the
    trainable set is fixed (``simu_core.distributed``); the masks stay those of the whole model.
    ``monitor``: checks the forget measure every ``eval_every`` steps and stops the run at a
    forgetting level (``simu_core.stopping``); None runs the whole budget.
    """
    spec = validate_unlearning(config, model, mask)
    objective = build_objective(config, spec)
    trainables = select_trainables(model, spec, mask, config.train_attention)
    if objective.needs_reference and reference is None:
        reference = frozen_reference(model)
    if distributed is not None:
        from simu_core.distributed import shard_model

        # FSDP makes its sharded parameters with the flags they have now: freeze before sharding.
        trainable_ids = {id(t.param) for t in trainables}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        shard_model(model, distributed)
        if reference is not None and objective.needs_reference:
            reference.requires_grad_(False)
            shard_model(reference, distributed)
        sharded = dict(model.named_parameters())
        trainables = [Trainable(t.name, sharded[t.name], t.mask, t.decay) for t in trainables]
    kwargs = dict(
        pad_token_id=pad_token_id, reference=reference if objective.needs_reference else None, seed=seed,
        autocast_dtype=autocast_dtype, checkpoint_dir=checkpoint_dir, progress=progress,
        progress_callback=progress_callback, fail_at_step=fail_at_step, description=f"unlearn {spec.name}",
        distributed=distributed, monitor=monitor,
    )
    args = (model, trainables, objective, forget_examples, retain_examples, config)
    if spec.optimizer == "sophia":
        return SophiaUnlearningTrainer(*args, hessian=config.hessian, **kwargs)
    return AdamWUnlearningTrainer(*args, **kwargs)


def run_unlearning(
    model: nn.Module,
    forget_examples: Sequence[EncodedExample],
    retain_examples: Sequence[EncodedExample],
    config: UnlearnConfig,
    **kwargs,
) -> UnlearningResult:
    """Unlearn in place with ``config.method``; keyword arguments as :func:`build_trainer`."""
    return build_trainer(model, forget_examples, retain_examples, config, **kwargs).train()
