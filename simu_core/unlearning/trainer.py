"""The unlearning trainer: one loop shared by every method, specialised per optimizer family.

:class:`UnlearningTrainer` owns the loop (TRL-style, one subclass per optimizer family):

- **Data.** Each forget batch is paired with a random retain batch of the same size. The whole
  schedule of batches is planned up front from the seed (:func:`plan_batches`), so a resumed run
  replays exactly the batches an uninterrupted one would have seen without saving a data RNG.
- **Step.** ``grad_accum`` micro-batches are accumulated per optimizer step (the last step of a
  run may have fewer), the gradient over trainable coordinates is clipped to ``max_grad_norm``,
  the lr follows a linear warm-up then linear decay to zero. ``epochs`` sets the length unless
  ``max_steps`` is given (then exactly ``max_steps`` steps, epochs repeat as needed).
- **Log.** One row per step: ``step, epoch, forget_loss, retain_loss, objective, forget_term,
  retain_term, lr, win_rate, grad_norm, tokens``. ``forget_loss`` / ``retain_loss`` are the mean
  answer-token cross-entropies of the step's forget / retain batches (whatever the objective), so
  they read the same for every method: forgetting raises ``forget_loss``. ``objective`` is the
  minimised value, ``lr`` the rate the step used, ``win_rate`` Sophia's fraction of unclipped
  coordinates (NaN for AdamW), ``grad_norm`` the norm before clipping, ``retain_weight`` the retain
  term's weight the step used (PDU's dual variable, which moves after every step; constant otherwise).
- **Checkpoints.** Every ``checkpoint_every`` steps: the trainable tensors (safetensors) and the
  optimizer / scheduler / RNG state (``torch.save`` of tensors and plain values only, read back with
  ``weights_only=True``), written to a temporary folder renamed into place last, so a folder named
  ``checkpoint-<step>`` is always complete. A trainer pointed at a folder with checkpoints resumes
  from the newest and ends bit-identical to an uninterrupted run (CPU).
- **Failure.** A non-finite loss or gradient norm raises :class:`NonFiniteLossError` naming the
  step; no checkpoint is written for that step and :meth:`UnlearningTrainer.train` returns nothing.

Frozen parameters get ``requires_grad=False`` for the run (no gradient, no optimizer state); the
previous flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from simu_core.config import UnlearnConfig
from simu_core.models.checkpointing import gradient_checkpointing
from simu_core.optim import ColumnMask, MaskedSophia, MasterAdamW, MaskSpec, sample_gnb_labels
from simu_core.optim.sharded import local_tensor
from simu_core.prompting import IGNORE_INDEX, EncodedExample, collate
from simu_core.scoring import answer_loss
from simu_core.unlearning.objective import ForgetInputs, RetainInputs, UnlearningObjective

if TYPE_CHECKING:
    from simu_core.distributed import DistributedContext
    from simu_core.stopping import ForgetMonitor

__all__ = [
    "AdamWUnlearningTrainer",
    "HESSIAN_VARIANTS",
    "LOG_COLUMNS",
    "MicroBatch",
    "NonFiniteLossError",
    "ProgressCallback",
    "SophiaUnlearningTrainer",
    "Trainable",
    "UnlearningResult",
    "UnlearningTrainer",
    "latest_checkpoint",
    "plan_batches",
]

HESSIAN_VARIANTS = ("gnb", "soul")
LOG_COLUMNS = (
    "step", "epoch", "forget_loss", "retain_loss", "objective", "forget_term", "retain_term",
    "lr", "win_rate", "grad_norm", "tokens", "retain_weight",
)
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d{{8}})$")
_TENSORS_FILE = "trainable.safetensors"
_STATE_FILE = "trainer_state.pt"
_FORMAT = 2  # 2: the retain weight (PDU's dual variable) and its log column

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the message names the step."""


@dataclass(frozen=True)
class Trainable:
    """A parameter the run updates, with its mask (None: every entry) and whether it is decayed."""

    name: str
    param: nn.Parameter
    mask: MaskSpec = None
    decay: bool = True

    def numel(self) -> int:
        """Number of trainable coordinates."""
        if self.mask is None:
            return self.param.numel()
        if isinstance(self.mask, ColumnMask):
            size = self.param.shape[self.mask.dim]
            return int(torch.as_tensor(self.mask.indices).numel()) * (self.param.numel() // max(1, size))
        return int(torch.as_tensor(self.mask).bool().sum())

    def masked_grad(self) -> torch.Tensor | None:
        """The gradient restricted to trainable coordinates (for the norm), or None without grad."""
        grad = self.param.grad
        if grad is None or self.mask is None:
            return grad
        if isinstance(self.mask, ColumnMask):
            return grad.index_select(self.mask.dim, torch.as_tensor(self.mask.indices, device=grad.device))
        return torch.where(self.mask.to(grad.device).bool(), grad, 0.0)


@dataclass(frozen=True)
class MicroBatch:
    """Indices of one forget batch and its paired retain batch."""

    epoch: int
    forget: tuple[int, ...]
    retain: tuple[int, ...]


@dataclass
class UnlearningResult:
    """What a finished run returns: the per-step log and summary figures."""

    log: pd.DataFrame
    wall_seconds: float
    steps: int
    resumed_from: int | None
    optimizer_state_bytes: int
    trainable_coordinates: int


def plan_batches(
    num_forget: int,
    num_retain: int,
    batch_size: int,
    grad_accum: int,
    epochs: int,
    max_steps: int | None,
    seed: int,
) -> list[list[MicroBatch]]:
    """The whole run's schedule: per optimizer step, its micro-batches (forget + paired retain).

    Forget items are reshuffled every epoch; each forget batch gets ``len(batch)`` retain items drawn
    without replacement (all of them when the retain set is smaller). Deterministic in ``seed``.
    """
    if num_forget < 1:
        raise ValueError("unlearning needs at least one forget example")
    if batch_size < 1 or grad_accum < 1 or epochs < 1:
        raise ValueError(f"batch_size, grad_accum and epochs must be >= 1, got {batch_size}, {grad_accum}, {epochs}")
    generator = torch.Generator().manual_seed(seed)
    micro_per_epoch = math.ceil(num_forget / batch_size)
    if max_steps is None:
        num_epochs = epochs
    else:  # max_steps overrides epochs (as in Hugging Face's Trainer): repeat epochs until covered.
        num_epochs = math.ceil(max_steps * grad_accum / micro_per_epoch)
    micro: list[MicroBatch] = []
    for epoch in range(num_epochs):
        order = torch.randperm(num_forget, generator=generator).tolist()
        for start in range(0, num_forget, batch_size):
            forget = tuple(order[start : start + batch_size])
            retain = ()
            if num_retain > 0:
                retain = tuple(torch.randperm(num_retain, generator=generator)[: len(forget)].tolist())
            micro.append(MicroBatch(epoch, forget, retain))
    steps = [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]
    return steps if max_steps is None else steps[:max_steps]


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The newest complete checkpoint folder under ``folder`` (None when there is none)."""
    if folder is None or not Path(folder).is_dir():
        return None
    found = sorted(
        (int(match.group(1)), path)
        for path in Path(folder).iterdir()
        if path.is_dir() and (match := _CHECKPOINT_RE.match(path.name))
    )
    return found[-1][1] if found else None


class UnlearningTrainer:
    """The shared unlearning loop; subclasses choose the optimizer (:meth:`create_optimizer`).

    Args:
        model: the model to unlearn, updated in place.
        trainables: what the run updates (everything else is frozen for the run).
        objective: the loss (forget term + retain term).
        forget_examples / retain_examples: tokenized items (answer-only labels).
        config: lr, epochs/max_steps, batch size, grad accumulation, warm-up, weight decay, clipping,
            Sophia settings and ``checkpoint_every``.
        pad_token_id: padding id for collation.
        reference: frozen reference model (NPO, KL retain loss); never updated.
        seed: seeds the batch plan, the global torch RNG and Sophia-G's label sampling.
        autocast_dtype: forward passes under autocast in this dtype (None / float32: off).
            Whatever the model's dtype, both optimizers keep fp32 state and, for bf16/fp16
            trainable tensors, an fp32 master copy; the model stays in its dtype.
        checkpoint_dir: where periodic checkpoints go and a run resumes from (None: no checkpoints).
        progress: show a tqdm bar.
        progress_callback: called after every step with ``(step, total_steps, log_row)``.
        fail_at_step: fault injection for tests: raise RuntimeError when this step is about to run.
        distributed: this process's place in a sharded run (``simu_core.distributed``): the model's
            parameters are FSDP shards, each micro-batch's items are split over the processes and
            every figure is summed over them (see that module); None: one process.
    """

    optimizer_family: ClassVar[str] = "base"

    def __init__(
        self,
        model: nn.Module,
        trainables: Sequence[Trainable],
        objective: UnlearningObjective,
        forget_examples: Sequence[EncodedExample],
        retain_examples: Sequence[EncodedExample],
        config: UnlearnConfig,
        *,
        pad_token_id: int,
        reference: nn.Module | None = None,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        progress_callback: ProgressCallback | None = None,
        fail_at_step: int | None = None,
        description: str = "unlearn",
        distributed: DistributedContext | None = None,
        monitor: ForgetMonitor | None = None,
        preferred_examples: Sequence[EncodedExample] | None = None,
    ) -> None:
        if not config.lr > 0:
            raise ValueError(f"unlearn.lr must be > 0, got {config.lr}")
        if not forget_examples:
            raise ValueError("unlearning needs at least one forget example")
        if objective.uses_retain and not retain_examples:
            raise ValueError("this objective has a retain term but the retain set is empty")
        if objective.needs_reference and reference is None:
            raise ValueError(
                f"the objective (forget={objective.forget!r}, retain={objective.retain!r}) needs a frozen "
                "reference model"
            )
        if objective.needs_preferred and (preferred_examples is None or
                                          len(preferred_examples) != len(forget_examples)):
            raise ValueError(
                f"the {objective.forget} loss needs one preferred answer per forget item "
                f"({len(forget_examples)}), got {0 if preferred_examples is None else len(preferred_examples)}"
            )
        # Entries with no trainable coordinate (an empty column set) are frozen, not trained.
        trainables = [t for t in trainables if t.numel() > 0]
        if not trainables:
            raise ValueError("nothing to train: every parameter is frozen")
        model_params = {id(p) for p in model.parameters()}
        seen: set[int] = set()
        for t in trainables:
            if id(t.param) not in model_params:
                raise ValueError(f"trainable {t.name!r} is not a parameter of the model")
            if id(t.param) in seen:
                raise ValueError(f"parameter {t.name!r} is listed twice among the trainables")
            seen.add(id(t.param))
        self.model = model
        self.trainables = list(trainables)
        self.objective = objective
        self.forget_examples = list(forget_examples)
        self.preferred_examples = list(preferred_examples) if objective.needs_preferred else []
        self.retain_weight = objective.retain_weight  # PDU: the dual variable, moved after every step
        self._control_vector: torch.Tensor | None = None
        self._adapters: dict[int, Any] = {}  # per model (and reference): its ArchitectureAdapter
        self.retain_examples = list(retain_examples) if objective.uses_retain else []
        self.config = config
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        self.progress_callback = progress_callback
        self.fail_at_step = fail_at_step
        self.description = description
        self.distributed = distributed
        self.monitor = monitor
        if distributed is not None and config.stop_refine:
            raise ValueError("unlearn.stop_refine is not available in sharded runs (run.devices > 1): "
                             "set unlearn.stop_refine=0")
        if distributed is not None and config.checkpoint_every:
            raise ValueError("periodic checkpoints are not written by sharded runs (unlearn.checkpoint_every=0)")
        self.device = distributed.device if distributed is not None else next(model.parameters()).device
        self.plan = plan_batches(
            len(self.forget_examples), len(self.retain_examples), config.batch_size, config.grad_accum,
            config.epochs, config.max_steps, seed,
        )
        self.total_steps = len(self.plan)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # ------------------------------------------------------------------------- subclass hooks

    def create_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimizer over :attr:`trainables` (subclasses)."""
        raise NotImplementedError

    def before_step(self, step: int, micro_batches: Sequence[MicroBatch]) -> None:
        """Called before a step's forward passes, with no gradient present (Sophia-G's refresh)."""

    def before_optimizer_step(self, step: int, loss_tokens: int) -> None:
        """Called after gradients are accumulated and clipped, before the optimizer step."""

    def optimizer_step(self, step: int, loss_tokens: int) -> None:
        """Apply the update."""
        self.optimizer.step()

    def win_rate(self) -> float:
        """Sophia's fraction of unclipped coordinates in the last step (NaN for other optimizers)."""
        return float("nan")

    def extra_state(self) -> dict[str, Any]:
        """Additional resumable state (tensors and plain values only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ------------------------------------------------------------------------------ helpers

    def param_groups(self) -> list[dict[str, Any]]:
        """Decayed and non-decayed groups (norms and biases are not decayed, as in HF's Trainer)."""
        decay = [t.param for t in self.trainables if t.decay]
        no_decay = [t.param for t in self.trainables if not t.decay]
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": self.config.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _batch(self, examples: Sequence[EncodedExample], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate([examples[i] for i in indices], self.pad_token_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the output of decoder layer ``layer`` (None: not captured)."""
        if layer is None:
            return self._logits(model, batch), None
        if id(model) not in self._adapters:
            from simu_core.models.adapter import ArchitectureAdapter

            self._adapters[id(model)] = ArchitectureAdapter(model)
        with self._adapters[id(model)].layer_output(layer) as captured:
            logits = self._logits(model, batch)
        return logits, captured[0]

    def control_vector(self, hidden_size: int) -> torch.Tensor:
        """RMU's fixed random direction, drawn once from the run's seed (not from the global RNG)."""
        if self._control_vector is None:
            from simu_core.unlearning.losses import rmu_control_vector

            generator = torch.Generator().manual_seed(self.seed)
            self._control_vector = rmu_control_vector(hidden_size, self.objective.rmu_steering_coeff, generator)
        return self._control_vector.to(self.device)

    def _forget_inputs(self, indices: Sequence[int]) -> ForgetInputs:
        """The forget batch of ``indices`` through the model (and what else the forget term reads)."""
        objective = self.objective
        batch = self._batch(self.forget_examples, indices)
        logits, hidden = self._forward(self.model, batch, objective.hidden_layer)
        inputs = ForgetInputs(logits, batch["labels"], self._reference_logits(batch, objective.forget_needs_reference),
                              hidden)
        if hidden is not None:
            inputs.control_vector = self.control_vector(hidden.shape[-1])
        if objective.needs_preferred:
            preferred = self._batch(self.preferred_examples, indices)
            inputs.preferred_logits = self._logits(self.model, preferred)
            inputs.preferred_labels = preferred["labels"]
            inputs.reference_preferred_logits = self._reference_logits(preferred, True)
        return inputs

    def _retain_inputs(self, indices: Sequence[int]) -> RetainInputs:
        """The retain batch of ``indices`` through the model (and the reference where the term reads it)."""
        objective = self.objective
        batch = self._batch(self.retain_examples, indices)
        layer = objective.hidden_layer
        logits, hidden = self._forward(self.model, batch, layer)
        inputs = RetainInputs(logits, batch["labels"], hidden=hidden)
        if objective.retain_needs_reference:
            with torch.no_grad():
                reference_logits, reference_hidden = self._forward(self.reference, batch, layer)
            inputs.reference_logits, inputs.reference_hidden = reference_logits, reference_hidden
        return inputs

    def _reference_logits(self, batch: dict[str, torch.Tensor], needed: bool) -> torch.Tensor | None:
        if not needed:
            return None
        with torch.no_grad():
            return self._logits(self.reference, batch)

    def _check_finite(self, value: torch.Tensor, what: str, step: int, micro: int | None = None) -> None:
        if not bool(torch.isfinite(value).all()):
            where = f"step {step}" + (f" (micro-batch {micro + 1})" if micro is not None else "")
            raise NonFiniteLossError(
                f"{self.description}: non-finite {what} ({float(value.detach())}) at {where} of {self.total_steps}; "
                "training stopped and no checkpoint was written for this step"
            )

    def fingerprint(self) -> str:
        """Identity of the run a checkpoint belongs to (resuming a different run is an error)."""
        settings = self.config.model_dump(mode="json")
        settings.pop("checkpoint_every", None)  # how often to save does not change the result
        settings.pop("gradient_checkpointing", None)  # nor does recomputing activations
        identity = {
            "format": _FORMAT,
            "family": self.optimizer_family,
            "config": settings,
            "objective": repr(self.objective),
            "seed": self.seed,
            "forget": len(self.forget_examples),
            "retain": len(self.retain_examples),
            "trainables": [(t.name, list(t.param.shape), t.numel()) for t in self.trainables],
            "total_steps": self.total_steps,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    # -------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, step: int, rows: list[dict[str, Any]]) -> Path:
        """Write a complete checkpoint for ``step`` atomically; older ones are removed."""
        folder = self.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = folder / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({t.name: t.param.detach().contiguous().cpu() for t in self.trainables}, str(tmp / _TENSORS_FILE))
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": _FORMAT,
            "step": step,
            "fingerprint": self.fingerprint(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "extra": self.extra_state(),
            "retain_weight": self.retain_weight,
            "log": {column: [row[column] for row in rows] for column in LOG_COLUMNS},
            "monitor": self.monitor.state() if self.monitor is not None else None,
        }
        torch.save(state, tmp / _STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the rename is what makes the checkpoint exist: always complete
        for old in folder.iterdir():
            match = _CHECKPOINT_RE.match(old.name)
            if match and int(match.group(1)) < step:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> tuple[int, list[dict[str, Any]]]:
        """Restore model tensors, optimizer, scheduler and RNG from ``path``; returns (step, log rows)."""
        # weights_only: only tensors and plain containers are accepted, never arbitrary pickles.
        state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != _FORMAT or state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                f"checkpoint {path} belongs to a different run (method, settings, data or trainable set "
                "differ); use another checkpoint folder or delete it"
            )
        tensors = load_file(str(path / _TENSORS_FILE))
        names = {t.name for t in self.trainables}
        if set(tensors) != names:
            raise ValueError(f"checkpoint {path} holds tensors {sorted(set(tensors) ^ names)[:4]} that do not match")
        with torch.no_grad():
            for t in self.trainables:
                t.param.copy_(tensors[t.name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.load_extra_state(state["extra"])
        self.retain_weight = float(state["retain_weight"])
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.load_state(state["monitor"])
        log = state["log"]
        rows = [{column: log[column][i] for column in LOG_COLUMNS} for i in range(len(log["step"]))]
        return int(state["step"]), rows

    # --------------------------------------------------------------------------------- loop

    def _freeze(self) -> dict[int, bool]:
        previous = {id(p): p.requires_grad for p in self.model.parameters()}
        trainable_ids = {id(t.param) for t in self.trainables}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        return previous

    def _restore_flags(self, previous: dict[int, bool]) -> None:
        for p in self.model.parameters():
            p.requires_grad_(previous.get(id(p), p.requires_grad))

    def _accumulate(self, step: int, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Forward/backward over the step's micro-batches; returns the step's loss figures."""
        if self.distributed is not None:
            return self._accumulate_sharded(step, micro_batches)
        objective, n = self.objective, len(micro_batches)
        sums = dict(forget_loss=0.0, retain_loss=0.0, forget_term=0.0, retain_term=0.0)
        tokens = 0
        for index, micro in enumerate(micro_batches):
            inputs = self._forget_inputs(micro.forget)
            term = objective.forget_term(inputs)
            self._check_finite(term, "forget loss", step, index)
            # Each term is backpropagated on its own so only one batch's graph is alive at a time.
            (objective.forget_weight * term / n).backward()
            with torch.no_grad():
                sums["forget_loss"] += float(answer_loss(inputs.logits.detach(), inputs.labels)) / n
            sums["forget_term"] += float(term.detach()) / n
            tokens += int((inputs.labels[:, 1:] != -100).sum())
            del inputs, term
            if objective.uses_retain:
                inputs = self._retain_inputs(micro.retain)
                term = objective.retain_term(inputs)
                self._check_finite(term, "retain loss", step, index)
                (self.retain_weight * term / n).backward()
                with torch.no_grad():
                    sums["retain_loss"] += float(answer_loss(inputs.logits.detach(), inputs.labels)) / n
                sums["retain_term"] += float(term.detach()) / n
                tokens += int((inputs.labels[:, 1:] != -100).sum())
                del inputs, term
        if not objective.uses_retain:
            sums["retain_loss"] = sums["retain_term"] = float("nan")
        sums["objective"] = objective.total(sums["forget_term"], sums["retain_term"], self.retain_weight)
        sums["tokens"] = tokens
        return sums

    def _share(self, examples: Sequence[EncodedExample], indices: Sequence[int], units: str,
               skipped: int = 0) -> tuple[list[int], float]:
        """This process's items of a micro-batch and its share of the loss: its answer tokens (or
        sequences, for sequence-level losses) over the micro-batch's; ``skipped``: leading answer
        tokens of each item the loss leaves out (CE-U). An empty chunk runs the first item with
        share 0 (FSDP's collectives need every process)."""
        mine = self.distributed.split(indices)

        def count(items: Sequence[int]) -> int:
            if units == "sequences":
                return len(items)
            return sum(max(0, sum(label != IGNORE_INDEX for label in examples[i].labels[1:]) - skipped)
                       for i in items)

        if not mine:
            return [indices[0]], 0.0
        total = count(indices)
        return mine, count(mine) / total if total else 0.0

    def _accumulate_sharded(self, step: int, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """:meth:`_accumulate` over this process's items; the figures are summed over processes."""
        objective, n = self.objective, len(micro_batches)
        local = torch.zeros(4, dtype=torch.float64)  # forget_loss, forget_term, retain_loss, retain_term
        tokens = 0
        for micro in micro_batches:
            # (items, indices, units of the loss's mean, inputs of the term, term, weight, slot in `local`)
            parts = [(self.forget_examples, micro.forget, objective.forget_units, self._forget_inputs,
                      objective.forget_term, objective.forget_weight, 0)]
            if objective.uses_retain:
                retain_units = "sequences" if objective.forget == "rmu" else "tokens"
                parts.append((self.retain_examples, micro.retain, retain_units, self._retain_inputs,
                              objective.retain_term, self.retain_weight, 2))
            for examples, indices, units, inputs_of, term_of, weight, slot in parts:
                mine, share = self._share(examples, indices, units,
                                          objective.forget_skipped_tokens if slot == 0 else 0)
                _, token_share = self._share(examples, indices, "tokens")
                inputs = inputs_of(mine)
                term = term_of(inputs) * share
                (weight * term / n).backward()
                with torch.no_grad():
                    local[slot] += float(answer_loss(inputs.logits.detach(), inputs.labels)) * token_share / n
                local[slot + 1] += float(term.detach()) / n
                tokens += sum(sum(label != IGNORE_INDEX for label in examples[i].labels[1:]) for i in indices)
                del inputs, term
        total = self.distributed.all_reduce_sum(local).cpu()
        sums = dict(forget_loss=float(total[0]), forget_term=float(total[1]), retain_loss=float(total[2]),
                    retain_term=float(total[3]))
        # Checked after the sum, so every process stops at the same step (a lone raise would hang the rest).
        self._check_finite(total[1], "forget loss", step)
        if objective.uses_retain:
            self._check_finite(total[3], "retain loss", step)
        else:
            sums["retain_loss"] = sums["retain_term"] = float("nan")
        sums["objective"] = objective.total(sums["forget_term"], sums["retain_term"], self.retain_weight)
        sums["tokens"] = tokens
        return sums

    def _clip_sharded(self) -> torch.Tensor:
        """:meth:`_clip` on local shards: squares summed over processes, torch's clipping formula."""
        grads = [local_tensor(t.param.grad) for t in self.trainables if t.param.grad is not None]
        return self.distributed.clip_grad_norm_(grads, self.config.max_grad_norm, norm_of=self.local_trainable_grads())

    def local_trainable_grads(self) -> list[torch.Tensor]:
        """This process's gradient entries of trainable coordinates (for the clipping norm)."""
        return [local_tensor(t.param.grad) for t in self.trainables if t.param.grad is not None]

    def _clip(self) -> torch.Tensor:
        """Clip the gradient to ``max_grad_norm``, measuring only trainable coordinates."""
        if self.distributed is not None:
            return self._clip_sharded()
        with_grad = [t for t in self.trainables if t.param.grad is not None]
        if not with_grad:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm([t.masked_grad() for t in with_grad], norm_type=2.0)
        torch.nn.utils.clip_grads_with_norm_([t.param for t in with_grad], self.config.max_grad_norm, norm)
        return norm

    def _snapshot(self) -> list[torch.Tensor]:
        """fp32 copies of the trainable parameters (whole tensors: frozen entries are copied back as they were)."""
        return [t.param.detach().float().clone() for t in self.trainables]

    def _fraction_setter(self, before: list[torch.Tensor]) -> Callable[[float], None]:
        """``apply(f)``: each trainable parameter set to ``before + f * (now - before)``, rounded once to its
        dtype; 0 and 1 give back exactly the model before and after the step, and an entry the step did
        not change (a frozen one) stays bit-identical for every ``f``."""
        after = self._snapshot()

        @torch.no_grad()
        def apply(fraction: float) -> None:
            for trainable, start, end in zip(self.trainables, before, after):
                value = start if fraction == 0 else end if fraction == 1 else \
                    torch.where(start == end, start, torch.lerp(start, end, fraction))  # where: keeps -0.0
                trainable.param.copy_(value.to(trainable.param.dtype))

        return apply

    def _stop_check(self, step: int, lr: float) -> bool:
        """The monitor's check; sharded, every process measures (FSDP gathers the weights for the
        forward passes) and all stop together if any reached the level."""
        reached = self.monitor.check(step, lr)
        if self.distributed is None:
            return reached
        return bool(self.distributed.all_reduce_sum(torch.tensor(float(reached), dtype=torch.float64)).item() > 0)

    def train(self) -> UnlearningResult:
        """Run (or resume) the whole schedule; returns the log and summary figures."""
        started = time.perf_counter()
        previous_flags = self._freeze()
        was_training = self.model.training
        checkpointing = gradient_checkpointing(self.model, self.config.gradient_checkpointing)
        checkpointing.__enter__()
        try:
            self.optimizer = self.create_optimizer()
            warmup = int(self.config.warmup_ratio * self.total_steps)
            self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
            start, rows, resumed_from = 0, [], None
            checkpoint = latest_checkpoint(self.checkpoint_dir)
            if checkpoint is not None:
                start, rows = self.load_checkpoint(checkpoint)
                resumed_from = start
            else:
                torch.manual_seed(self.seed)
                # The model as it starts: a run whose target already reaches the level trains nothing.
                if self.monitor is not None and self._stop_check(0, 0.0):
                    start = self.total_steps
            self.model.train()
            if self.reference is not None:
                self.reference.eval()
            bar = tqdm(total=self.total_steps, initial=start, desc=self.description, disable=not self.progress,
                       leave=False)
            for index in range(start, self.total_steps):
                step = index + 1
                if self.fail_at_step is not None and step == self.fail_at_step:
                    raise RuntimeError(
                        f"{self.description}: injected fault (run.fail_at_unlearn_step={step}) before step {step}"
                    )
                micro_batches = self.plan[index]
                self.optimizer.zero_grad(set_to_none=True)
                self.before_step(step, micro_batches)
                figures = self._accumulate(step, micro_batches)
                grad_norm = self._clip()
                self._check_finite(grad_norm, "gradient norm", step)
                self.before_optimizer_step(step, figures["tokens"])
                lr = self.optimizer.param_groups[0]["lr"]
                # unlearn.stop_refine: the model before a step that a check follows, to bisect that step.
                before = self._snapshot() if self.config.stop_refine and self.monitor is not None and \
                    self.monitor.due(step, self.total_steps) else None
                self.optimizer_step(step, figures["tokens"])
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                row = {
                    "step": step,
                    "epoch": micro_batches[-1].epoch,
                    "forget_loss": figures["forget_loss"],
                    "retain_loss": figures["retain_loss"],
                    "objective": figures["objective"],
                    "forget_term": figures["forget_term"],
                    "retain_term": figures["retain_term"],
                    "lr": float(lr),
                    "win_rate": self.win_rate(),
                    "grad_norm": float(grad_norm),
                    "tokens": figures["tokens"],
                    "retain_weight": self.retain_weight if self.objective.uses_retain else float("nan"),
                }
                rows.append(row)
                if self.objective.has_dual:  # PDU: projected dual ascent on the retain constraint
                    from simu_core.unlearning.losses import pdu_dual_update

                    self.retain_weight = pdu_dual_update(self.retain_weight, figures["retain_term"],
                                                         self.objective.pdu_retain_eps, self.objective.pdu_dual_step)
                # Checked before the checkpoint, so a resumed run never repeats or skips a check.
                stop = self.monitor is not None and self.monitor.due(step, self.total_steps) and \
                    self._stop_check(step, float(lr))
                if stop and before is not None:
                    self.monitor.refine(step, float(lr), self._fraction_setter(before), self.config.stop_refine)
                if not stop and self.checkpoint_dir is not None and self.config.checkpoint_every and \
                        step % self.config.checkpoint_every == 0 and step < self.total_steps:
                    self.save_checkpoint(step, rows)
                bar.update(1)
                bar.set_postfix(forget=f"{row['forget_loss']:.3f}", retain=f"{row['retain_loss']:.3f}")
                if self.progress_callback is not None:
                    self.progress_callback(step, self.total_steps, row)
                if stop:
                    break
            bar.close()
            state_bytes = _state_bytes(self.optimizer)
            if self.distributed is not None:  # every process holds its shards' state: the total
                state_bytes = int(self.distributed.all_reduce_sum(torch.tensor(float(state_bytes))).item())
        finally:
            checkpointing.__exit__(None, None, None)
            self.model.train(was_training)
            self._restore_flags(previous_flags)
        log = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
        return UnlearningResult(
            log=log,
            wall_seconds=time.perf_counter() - started,
            steps=len(rows),
            resumed_from=resumed_from,
            optimizer_state_bytes=state_bytes,
            trainable_coordinates=sum(t.numel() for t in self.trainables),
        )


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class AdamWUnlearningTrainer(UnlearningTrainer):
    """First-order methods (GA, FO-GradDiff, NPO, SimNPO, ..., and ``fo_simu_<loss>`` on SIMU's scope
    through column masks).

    :class:`MasterAdamW` rather than ``torch.optim.AdamW``: the same update, but with fp32 masters
    for bf16/fp16 weights (as masked Sophia keeps), so small steps are not rounded away in bf16.
    """

    optimizer_family = "adamw"

    def create_optimizer(self) -> torch.optim.Optimizer:
        masks = {t.param: t.mask for t in self.trainables if t.mask is not None}
        if any(not isinstance(mask, ColumnMask) for mask in masks.values()):
            raise ValueError("the AdamW trainer takes column masks (SIMU's scope) only")
        return MasterAdamW(self.param_groups(), lr=self.config.lr, betas=tuple(self.config.betas), masks=masks)

    def local_trainable_grads(self) -> list[torch.Tensor]:
        parts = [self.optimizer.trainable_part(t.param, local_tensor(t.param.grad))
                 for t in self.trainables if t.param.grad is not None]
        return [part for part in parts if part is not None]


class SophiaUnlearningTrainer(UnlearningTrainer):
    """Second-order methods (SO-GradDiff, SIMU, SO-NPO, SIMU-NPO): masked Sophia.

    ``hessian="soul"``: every step h is refreshed from the clipped gradient of the actual loss.
    ``hessian="gnb"``: every ``hessian_interval`` steps (steps 1, k+1, 2k+1, ...: before the update,
    so the first step already has a curvature estimate instead of h = 0) the step's batches are
    forwarded without labels, labels are sampled from the model's softmax, the mean cross-entropy
    over non-padding positions is backpropagated and h is refreshed from that gradient.
    ``bs`` in ``rho * bs * h`` is ``hessian_batch_size`` or else the number of loss terms the
    gradient behind h averaged (answer tokens for ``soul``, sampled positions for ``gnb``).
    """

    optimizer_family = "sophia"

    def __init__(self, *args: Any, hessian: str = "soul", **kwargs: Any) -> None:
        if hessian not in HESSIAN_VARIANTS:
            raise ValueError(f"unknown Hessian variant {hessian!r}; known: {list(HESSIAN_VARIANTS)}")
        super().__init__(*args, **kwargs)
        self.hessian = hessian
        self._hessian_bs = 1
        # Sharded runs sample Sophia-G's labels per process: other draws, the same distribution.
        rank = self.distributed.rank if self.distributed is not None else 0
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed + 1 + 7919 * rank)

    def fingerprint(self) -> str:
        return hashlib.sha256((super().fingerprint() + self.hessian).encode()).hexdigest()

    def create_optimizer(self) -> torch.optim.Optimizer:
        masks = {t.param: t.mask for t in self.trainables if t.mask is not None}
        return MaskedSophia(
            self.param_groups(),
            lr=self.config.lr,
            betas=tuple(self.config.betas),
            rho=self.config.rho,
            weight_decay=self.config.weight_decay,
            hessian_batch_size=self.config.hessian_batch_size or 1,
            masks=masks,
        )

    def local_trainable_grads(self) -> list[torch.Tensor]:
        grads = []
        for t in self.trainables:
            if t.param.grad is not None:
                part = self.optimizer.trainable_part(t.param, local_tensor(t.param.grad))
                if part is not None:
                    grads.append(part)
        return grads

    def before_step(self, step: int, micro_batches: Sequence[MicroBatch]) -> None:
        if self.hessian != "gnb" or (step - 1) % self.config.hessian_interval != 0:
            return
        chunks = []  # (examples, items); a sharded run's empty chunk runs one item with weight 0
        for micro in micro_batches:
            chunks.append((self.forget_examples, micro.forget))
            if self.retain_examples:
                chunks.append((self.retain_examples, micro.retain))
        positions = sum(len(examples[i].input_ids) for examples, items in chunks for i in items)
        for examples, items in chunks:
            weight = 1.0
            if self.distributed is not None:
                mine = self.distributed.split(items)
                items, weight = (mine, 1.0) if mine else ([items[0]], 0.0)
            batch = self._batch(examples, items)
            logits = self._logits(self.model, batch)
            sampled = sample_gnb_labels(logits, self._generator)
            ce = F.cross_entropy(logits.float().flatten(0, 1), sampled.flatten(), reduction="none")
            (ce.mul(batch["attention_mask"].flatten()).sum() * weight / positions).backward()
            del logits, ce
        self.optimizer.update_hessian()
        self.optimizer.zero_grad(set_to_none=True)
        self._hessian_bs = positions

    def before_optimizer_step(self, step: int, loss_tokens: int) -> None:
        if self.hessian == "soul":
            self.optimizer.update_hessian()
            self._hessian_bs = loss_tokens

    def optimizer_step(self, step: int, loss_tokens: int) -> None:
        self.optimizer.step(bs=self.config.hessian_batch_size or max(1, self._hessian_bs))

    def win_rate(self) -> float:
        rate = self.optimizer.last_win_rate
        return float("nan") if rate is None else rate

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "hessian_bs": self._hessian_bs}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._hessian_bs = int(state["hessian_bs"])
