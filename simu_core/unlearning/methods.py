"""Unlearning methods: a loss x an optimizer x a trainable scope (SIMU step 2 and its baselines).

A method's name says its three parts (:mod:`simu_core.method_names`: ``simu`` = GradDiff x Sophia x
SIMU's scope, ``simu_dpo`` = DPO x Sophia x SIMU's scope, ``rmu`` = RMU x AdamW x its layers, ...).

- **Loss** (:mod:`simu_core.unlearning.objective`): ``ga``, ``undial`` and ``ceu`` have no retain
  term (as published and in open-unlearning); every other loss adds
  ``unlearn.retain_weight`` x a retain term, ``unlearn.retain_loss`` (``nll``: GradDiff's; ``kl``:
  KL to the frozen reference), except RMU, whose retain term is its own (the hidden state of
  ``rmu_layer`` held at the frozen model's).
- **Optimizer**: ``adamw`` (fp32 master AdamW) or ``sophia`` (masked Sophia, ``unlearn.hessian``:
  ``gnb`` or ``soul``; see :class:`~simu_core.unlearning.trainer.SophiaUnlearningTrainer`).
- **Scope**: ``all`` parameters; ``simu``: every attention projection in full (unless
  ``train_attention`` is off: then the critical columns only) and, in each MLP down projection, only
  the columns of the critical neurons (compact optimizer state via ``ColumnMask``), everything else,
  down-projection biases included, frozen; ``layers``: RMU's published set, the MLP down-projection
  weights of layers ``rmu_layer - 2 .. rmu_layer`` (WMDP's and open-unlearning's ``(5|6|7)`` for
  layer 7).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from simu_core.config import UnlearnConfig
from simu_core.method_names import ALL_METHODS, LEGACY_METHODS, PREFERENCE_LOSSES, MethodName, parse_method
from simu_core.masking import NeuronMask
from simu_core.models.adapter import ArchitectureAdapter
from simu_core.optim import ColumnMask
from simu_core.prompting import EncodedExample
from simu_core.unlearning.objective import UnlearningObjective
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
    "rmu_layers",
    "run_unlearning",
    "select_trainables",
    "validate_unlearning",
]


MethodSpec = MethodName  # what a method name means: loss, optimizer, scope

METHODS: dict[str, MethodSpec] = {name: ALL_METHODS[name] for name in LEGACY_METHODS}  # version 1's names


def get_method(name: str) -> MethodSpec:
    """What the method ``name`` means (ValueError naming the known patterns otherwise)."""
    return parse_method(name)


def rmu_layers(rmu_layer: int) -> tuple[int, ...]:
    """The decoder layers whose MLP down projection RMU's published scope trains."""
    return tuple(range(max(0, rmu_layer - 2), rmu_layer + 1))


def _is_decayed(name: str, param: nn.Parameter) -> bool:
    # As Hugging Face's Trainer: no weight decay on biases and normalisation weights.
    return param.ndim >= 2 and "norm" not in name.lower()


def validate_unlearning(
    config: UnlearnConfig, model: nn.Module, mask: NeuronMask | None = None,
    preferred_examples: Sequence[EncodedExample] | None = None, forget_count: int | None = None,
) -> MethodSpec:
    """Check a run's inputs before any training; returns the method. Raises ValueError naming the problem."""
    spec = get_method(config.method)
    if not config.lr > 0:
        raise ValueError(f"unlearn.lr must be > 0, got {config.lr}")
    if spec.optimizer == "sophia" and config.hessian not in HESSIAN_VARIANTS:
        raise ValueError(f"unknown unlearn.hessian {config.hessian!r}; known: {list(HESSIAN_VARIANTS)}")
    if spec.loss == "rmu":
        layers = ArchitectureAdapter(model).num_layers
        if not 0 <= config.rmu_layer < layers:
            raise ValueError(
                f"unlearn.rmu_layer={config.rmu_layer}: the model has {layers} decoder layers (0..{layers - 1}); "
                f"RMU's published layer 7 is for 32-layer 7B models (set unlearn.rmu_layer, e.g. {layers // 4 or 0})"
            )
    if spec.loss in PREFERENCE_LOSSES and forget_count is not None:
        if preferred_examples is None or len(preferred_examples) != forget_count:
            raise ValueError(f"method {spec.name!r} needs one preferred answer per forget item ({forget_count})")
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
    model: nn.Module, spec: MethodSpec, mask: NeuronMask | None = None, train_attention: bool = True,
    rmu_layer: int = 7,
) -> list[Trainable]:
    """The parameters (and per-parameter masks) a method updates."""
    if spec.scope == "all":
        return [Trainable(name, p, None, _is_decayed(name, p)) for name, p in model.named_parameters()]
    adapter = ArchitectureAdapter(model)
    if spec.scope == "layers":
        chosen = set(rmu_layers(rmu_layer))
        return [Trainable(f"{down.name}.weight", down.weight, None) for down in adapter.down_projections()
                if down.layer in chosen]
    if mask is None:
        raise ValueError(f"method {spec.name!r} needs a critical-neuron mask")
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
    """The loss of a method with the config's weights and hyper-parameters."""
    spec = spec or get_method(config.method)
    forget = "ga" if spec.loss == "graddiff" else spec.loss
    uses_retain = spec.uses_retain
    return UnlearningObjective(
        forget=forget,
        retain=config.retain_loss if uses_retain else None,
        forget_weight=config.forget_weight,
        # RMU's activation term is on another scale: its weight is its own (open-unlearning's alpha 1000).
        retain_weight=(config.rmu_alpha if spec.loss == "rmu" else config.retain_weight) if uses_retain else 0.0,
        npo_beta=config.npo_beta,
        simnpo_beta=config.simnpo_beta,
        simnpo_gamma=config.simnpo_gamma,
        dpo_beta=config.dpo_beta,
        undial_beta=config.undial_beta,
        wga_beta=config.wga_beta,
        satimp_beta1=config.satimp_beta1,
        satimp_beta2=config.satimp_beta2,
        ceu_ignore_first=config.ceu_ignore_first,
        pdu_retain_eps=config.pdu_retain_eps,
        pdu_dual_step=config.pdu_dual_step,
        rmu_layer=config.rmu_layer,
        rmu_steering_coeff=config.rmu_steering_coeff,
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
    preferred_examples: Sequence[EncodedExample] | None = None,
) -> UnlearningTrainer:
    """Validate the inputs and build the trainer of ``config.method``.

    ``reference``: the frozen model NPO and the KL retain loss compare against; when the objective
    needs one and none is given, a frozen copy of ``model`` as it is before unlearning is taken.
    ``distributed``: shard ``model`` (and the reference) with FSDP over this process group once the
    trainable set is fixed (``simu_core.distributed``); the masks stay those of the whole model.
    ``monitor``: checks the forget measure every ``eval_every`` steps and stops the run at a
    forgetting level (``simu_core.stopping``); None runs the whole budget.
    ``preferred_examples``: the preference losses' preferred answer of each forget item, in the forget
    items' order (``simu_core.preferred``).
    """
    spec = validate_unlearning(config, model, mask, preferred_examples, len(forget_examples))
    objective = build_objective(config, spec)
    trainables = select_trainables(model, spec, mask, config.train_attention, config.rmu_layer)
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
        distributed=distributed, monitor=monitor, preferred_examples=preferred_examples,
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
