"""Memory plan: what each stage needs per device, from a model's ``config.json``, before any run.

The estimate is a simulation, not a formula. The model is built from its config under
``FakeTensorMode`` (tensors with real shapes and dtypes, no storage) and the stage's own step runs
on it under :class:`~simu_core.memtrack.TensorMemoryTracker`: the unlearning step as
:class:`~simu_core.unlearning.UnlearningTrainer` runs it (forget and retain forward/backward with the
method's frozen set and autocast, the logged loss, clipping, the real optimizer's Hessian update and
step, twice so that the optimizer state exists), fine-tuning's AdamW step, attribution's and
evaluation's passes. The peak of live tensor bytes is what ``torch.cuda.max_memory_allocated``
would report for that step on CPU kernels (a GPU's fused attention saves about as much). Nothing is
loaded or allocated. Decoder layers are alike, so every figure is affine in the number of layers:
a model of more than :data:`EXACT_LAYERS` layers is simulated with 2 and 3 of its layers and
extrapolated (exact for the phases' peaks; ``tests/test_planning.py`` compares it with full depth).

Reported per stage, in bytes per device: weights (and a frozen reference model's), fp32 master
copies, optimizer state, gradients, "activations" (the simulated peak above those: saved
activations plus the backward's temporaries) with and without gradient checkpointing, and the
peak. For FSDP over N devices (fine-tuning and unlearning) every persistent part is divided by N and the
batch per device is ``ceil(batch / N)`` (activations are linear in it); added are the parameters
FSDP holds unsharded (the root's embeddings, norm and head for the whole step, two decoder layers
gathered at a time) and one layer's unsharded gradients (and their fp32 copy for the
reduce-scatter). Sequences are taken ``model.max_length`` tokens long (a batch is padded to its
longest item: the worst case). A stage fits a device when its peak leaves :data:`HEADROOM` of the
device free (CUDA context, allocator fragmentation, communication buffers).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from simu_core.config import SimuConfig
from simu_core.masking import NeuronMask
from simu_core.memtrack import TensorMemoryTracker
from simu_core.method_names import parse_method
from simu_core.prompting import IGNORE_INDEX, EncodedExample

__all__ = [
    "DEVICE_COUNTS",
    "GiB",
    "HEADROOM",
    "MemoryPlan",
    "PlanError",
    "StageMemory",
    "StepMemory",
    "architecture_config",
    "check_fits",
    "check_mask_shape",
    "device_memory",
    "format_plan",
    "full_length_examples",
    "mask_for_plan",
    "neurons_per_layer",
    "plan_memory",
    "read_plan_mask",
    "run_device_memory",
    "simulate_step",
]

GiB = 2**30
#: Fraction of a device's memory a plan leaves free (CUDA context, fragmentation, NCCL buffers).
HEADROOM = 0.10
#: Device counts planned for FSDP fine-tuning and unlearning (plus ``run.devices``).
DEVICE_COUNTS = (1, 2, 4, 8)
#: Models of at most this many layers are simulated whole; deeper ones from 2 and 3 layers.
EXACT_LAYERS = 4
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlanError(ValueError):
    """The plan cannot be made, or the run cannot fit; the message names the numbers."""


# ----------------------------------------------------------------------------------------------
# the model's shapes


def architecture_config(config: SimuConfig) -> Any:
    """The Hugging Face config of the model the run trains and unlearns, read without weights.

    ``model.target`` (what attribution and unlearning load) or ``model.base``: their
    ``config.json`` (a local folder, or the hub/cache); neither: the tiny Llama of the built-in
    benchmark, from ``model.tiny`` (its vocabulary is at most ``model.tiny.vocab_size``).
    """
    from transformers import AutoConfig, LlamaConfig

    reference = config.model.target or config.model.base
    if reference is None:
        tiny = config.model.tiny
        return LlamaConfig(
            vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_heads,
            max_position_embeddings=max(config.model.max_length, 64), tie_word_embeddings=False,
        )
    try:
        return AutoConfig.from_pretrained(str(reference), trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        name = "model.target" if config.model.target else "model.base"
        raise PlanError(f"{name}: cannot read the model's config.json from {reference!r} ({error})") from None


def _num_layers(model_config: Any) -> int:
    return int(getattr(model_config, "num_hidden_layers"))


def _with_layers(model_config: Any, layers: int) -> Any:
    """A copy of a model config with ``layers`` decoder layers (per-layer lists cut to match)."""
    shallow = copy.deepcopy(model_config)
    shallow.num_hidden_layers = layers
    if isinstance(getattr(shallow, "layer_types", None), list):
        shallow.layer_types = shallow.layer_types[:layers]
    return shallow


def _new_fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _fake_mode(mode: Any = None) -> Iterator[Any]:
    """Inside: new tensors are fake (CPU device, no storage). ``mode``: re-enter an existing one, so
    that the tensors it made can be used again (fake tensors of two modes do not mix)."""
    mode = mode or _new_fake_mode()
    with mode, torch.device("cpu"):
        yield mode


def _model_from_config(model_config: Any, trust_remote_code: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` (fake parameters inside a fake mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust_remote_code)


def _fake_model(model_config: Any, config: SimuConfig) -> nn.Module:
    """A causal LM with fake parameters of the config's shapes in ``model.dtype`` (inside a fake mode)."""
    return _model_from_config(model_config, config.model.trust_remote_code, _DTYPES[config.model.dtype])


def _neurons_per_layer(model: nn.Module) -> list[int]:
    from simu_core.models.adapter import ArchitectureAdapter

    return ArchitectureAdapter(model).neurons_per_layer()


def neurons_per_layer(model_path: str | Path, trust_remote_code: bool = False) -> list[int]:
    """MLP neurons per layer of the model at ``model_path`` (a folder or hub id), from its config only."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise PlanError(f"cannot read the model's config.json from {str(model_path)!r} ({error})") from None
    with _fake_mode():
        width = _neurons_per_layer(_model_from_config(_with_layers(model_config, 1), trust_remote_code))[0]
    return [width] * _num_layers(model_config)


def full_length_examples(count: int, seq_len: int, vocab_size: int, seed: int) -> list[EncodedExample]:
    """Random items of exactly ``seq_len`` tokens, the second half labelled: the full-length
    sequences a plan assumes, for measuring a real step against it (tests, benchmarks)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        ids = rng.integers(3, vocab_size, seq_len).tolist()
        items.append(EncodedExample(ids, [IGNORE_INDEX] * (seq_len // 2) + ids[seq_len // 2:]))
    return items


def mask_for_plan(neurons_per_layer: Sequence[int], fraction: float) -> NeuronMask:
    """An assumed SIMU mask: ``fraction`` of each layer's neurons (at least one); only counts matter."""
    if not 0 < fraction <= 1:
        raise PlanError(f"the mask fraction must be in (0, 1], got {fraction}")
    return NeuronMask(
        neurons=tuple(tuple(range(max(1, round(fraction * size)))) for size in neurons_per_layer),
        num_neurons=tuple(neurons_per_layer),
    )


def check_mask_shape(mask: NeuronMask, neurons_per_layer: Sequence[int], where: str = "the mask") -> None:
    """Raise :class:`PlanError` naming both shapes when a mask was made for another model."""
    try:
        mask.check_matches(neurons_per_layer)
    except ValueError as error:
        raise PlanError(f"{where}: {error}") from None


def read_plan_mask(path: str | Path) -> NeuronMask:
    """A mask from ``mask.parquet`` or a folder (stage output, run folder) holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "mask.parquet"
    if not path.is_file():
        raise PlanError(f"mask file {str(path)!r} does not exist")
    return NeuronMask.load(path)


# ----------------------------------------------------------------------------------------------
# simulations


@dataclass(frozen=True)
class StepMemory:
    """Simulated bytes of one training step on one device (see the module docstring)."""

    weights: int  # the model's parameters and buffers
    reference: int  # a frozen reference model's
    master: int  # fp32 masters of low-precision trainable entries
    optimizer: int  # moments / Hessian estimate
    gradients: int
    activations: int  # alive when a backward starts (saved activations, logits, loss), beyond the rest
    fwd_bwd_peak: int  # peak during the forward/backward passes
    optimizer_peak: int  # peak during clipping and the optimizer step
    trainable: int  # trainable coordinates
    layer_params: int  # the largest decoder layer's parameter bytes
    layer_trainable: int  # ... of its trainable parameters
    root_params: int  # parameters outside the decoder layers (embeddings, final norm, head)
    root_trainable: int
    trainable_tensors: int = 0  # elements of the tensors that hold a trainable entry (unlearn.stop_refine's copies)

    @property
    def persistent(self) -> int:
        return self.weights + self.reference + self.master + self.optimizer

    @property
    def backward_excess(self) -> int:
        """The forward/backward peak above weights, optimizer state and all gradients."""
        return max(0, self.fwd_bwd_peak - self.persistent - self.gradients)

    @property
    def optimizer_transient(self) -> int:
        """The optimizer phase's peak above weights, optimizer state and gradients."""
        return max(0, self.optimizer_peak - self.persistent - self.gradients)

    @property
    def peak(self) -> int:
        return max(self.fwd_bwd_peak, self.optimizer_peak)


_PER_MODEL = ("layer_params", "layer_trainable", "root_params", "root_trainable")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers' warnings off (e.g. that checkpointing turns off the KV cache): not the plan's news."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _at_depth(simulate: Callable[[Any], StepMemory], model_config: Any, depths: tuple[int, int] = (2, 3)) -> StepMemory:
    """``simulate(model_config)``, or for a deep model its affine extrapolation from ``depths`` layers
    (2 and 3; RMU's fixed three trainable layers: 3 and 4, so that the slope is one frozen layer)."""
    layers = _num_layers(model_config)
    with _quiet_transformers():
        if layers <= EXACT_LAYERS:
            return simulate(model_config)
        low, high = (simulate(_with_layers(model_config, depth)) for depth in depths)
    values = {}
    for item in fields(StepMemory):
        a, b = getattr(low, item.name), getattr(high, item.name)
        values[item.name] = b if item.name in _PER_MODEL else a + (layers - depths[0]) * (b - a)
    return StepMemory(**values)


def _tokens(batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    input_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the prompt; how many tokens are labelled does not change memory
    return {"input_ids": input_ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long), "labels": labels}


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_parts(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(master bytes, other state bytes) of an optimizer's state."""
    master = other = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if key == "master":
                    master += _bytes([value])
                else:
                    other += _bytes([value])
    return master, other


def _layer_and_root(model: nn.Module, trainable_ids: set[int]) -> dict[str, int]:
    from simu_core.models.adapter import ArchitectureAdapter

    layers = ArchitectureAdapter._find_layers(model)[1]
    in_layers = {id(p) for p in layers.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    largest = max(layers, key=lambda layer: _bytes(list(layer.parameters())))
    return {
        "layer_params": _bytes(list(largest.parameters())),
        "layer_trainable": _bytes([p for p in largest.parameters() if id(p) in trainable_ids]),
        "root_params": _bytes(root),
        "root_trainable": _bytes([p for p in root if id(p) in trainable_ids]),
    }


def simulate_step(
    model_config: Any,
    config: SimuConfig,
    stage: str = "unlearn",
    batch: int | None = None,
    seq_len: int | None = None,
    mask_fraction: float = 0.05,
    gradient_checkpointing: bool | None = None,
    optimizer_step: bool = True,
) -> StepMemory:
    """Simulate one step of ``stage`` (``unlearn``, ``finetune`` or ``relearn``) at full depth (extrapolated).

    ``unlearn``: the trainer's step with ``config.unlearn`` (SIMU-scope methods with
    ``mask_fraction`` of each layer's neurons). ``finetune``: fine-tuning's step (every parameter,
    AdamW). ``relearn``: the relearning attack's step (every parameter, MasterAdamW, no weight
    decay, no checkpointing, ``relearn.batch_size`` items). ``batch`` / ``seq_len`` default to the
    stage's batch size and ``model.max_length``; ``gradient_checkpointing`` to the stage's setting.
    ``optimizer_step=False`` skips the optimizer (and its state): for activation figures only.
    """
    if stage not in ("unlearn", "finetune", "relearn"):
        raise ValueError(f"stage must be 'unlearn', 'finetune' or 'relearn', got {stage!r}")
    settings = {"unlearn": config.unlearn, "finetune": config.model.finetune,
                "relearn": _relearn_settings(config)}[stage]
    batch = batch or settings.batch_size
    seq_len = seq_len or config.model.max_length
    checkpointing = settings.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    depths = (2, 3)
    method = parse_method(config.unlearn.method) if stage == "unlearn" else None
    full_depth = _num_layers(model_config)

    def simulate(shape: Any) -> StepMemory:
        run_config = config
        depth = _num_layers(shape)
        if method is not None and method.loss == "rmu" and depth < full_depth:
            # A shallower stand-in: RMU reads its last layer (its layer set: layers 0-2, all trainable).
            layer = 2 if method.scope == "layers" else min(config.unlearn.rmu_layer, depth - 1)
            run_config = config.model_copy(update={"unlearn": config.unlearn.model_copy(update={"rmu_layer": layer})})
        return _simulate_step(shape, run_config, stage, batch, seq_len, mask_fraction, checkpointing, optimizer_step)

    if method is not None and method.loss == "rmu" and method.scope == "layers":
        depths = (3, 4)
    return _at_depth(simulate, model_config, depths)


def _relearn_settings(config: SimuConfig) -> Any:
    """The attack's step as a fine-tuning step (``simu_core.attacks.relearn.relearn_curve``: MasterAdamW
    over every parameter at a constant lr, no weight decay, clipped, never checkpointed)."""
    relearn = config.relearn
    return config.model.finetune.model_copy(update={
        "batch_size": relearn.batch_size, "lr": relearn.lr, "weight_decay": 0.0, "gradient_checkpointing": False})


def _simulate_step(
    model_config: Any, config: SimuConfig, stage: str, batch: int, seq_len: int, mask_fraction: float,
    checkpointing: bool, optimizer_step: bool,
) -> StepMemory:
    from simu_core.models.checkpointing import enable_gradient_checkpointing
    from simu_core.optim import MaskedSophia, MasterAdamW
    from simu_core.scoring import answer_loss
    from simu_core.unlearning import ForgetInputs, RetainInputs, build_objective, get_method, select_trainables

    if stage == "unlearn":
        settings = config.unlearn
        spec = get_method(settings.method)
        objective = build_objective(settings, spec)
    else:  # fine-tuning, or the relearning attack's step (the same loss on every parameter)
        settings = config.model.finetune if stage == "finetune" else _relearn_settings(config)
        spec, objective = get_method("ga"), None
    with _fake_mode() as mode:
        model = _fake_model(model_config, config)
        reference = _fake_model(model_config, config) if objective is not None and objective.needs_reference else None
    # The trainable set and the optimizer are built outside the fake mode: the optimizer checks the
    # mask's indices by value, so they must stay real. Everything that allocates runs inside it.
    mask = mask_for_plan(_neurons_per_layer(model), mask_fraction) if spec.needs_mask else None
    trainables = [t for t in select_trainables(model, spec, mask, getattr(settings, "train_attention", True),
                                               getattr(settings, "rmu_layer", 7)) if t.numel() > 0]
    trainable_ids = {id(t.param) for t in trainables}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    if checkpointing:
        enable_gradient_checkpointing(model)  # a throwaway fake model: never switched off
    model.train()
    tracker = TensorMemoryTracker()
    weights = tracker.register([*model.parameters(), *model.buffers()])
    reference_bytes = 0
    if reference is not None:
        reference.eval().requires_grad_(False)
        reference_bytes = tracker.register([*reference.parameters(), *reference.buffers()])
    decay = settings.weight_decay
    groups = [{"params": [t.param for t in trainables if t.decay], "weight_decay": decay},
              {"params": [t.param for t in trainables if not t.decay], "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if spec.optimizer == "sophia":
        optimizer: torch.optim.Optimizer = MaskedSophia(
            groups, lr=settings.lr, betas=tuple(settings.betas), rho=settings.rho, weight_decay=decay,
            masks={t.param: t.mask for t in trainables if t.mask is not None},
        )
    else:
        optimizer = MasterAdamW(groups, lr=settings.lr, betas=tuple(getattr(settings, "betas", (0.9, 0.95))))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if stage == "unlearn" and config.run.dtype == "bfloat16"
                else contextlib.nullcontext())
    with _fake_mode(mode):
        inputs = _tokens(batch, seq_len)

    saved = [0]  # the largest activation footprint when a backward starts

    def backward(loss: torch.Tensor) -> None:
        gradients_now = _bytes([t.param.grad for t in trainables if t.param.grad is not None])
        saved[0] = max(saved[0], tracker.live - persistent - gradients_now)
        loss.backward()

    layer = objective.hidden_layer if objective is not None else None

    def run(which: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and (rmu) the hidden state after ``layer``, as the trainer's forward captures it."""
        from simu_core.models.adapter import ArchitectureAdapter

        with ArchitectureAdapter(which).layer_output(layer) as captured, autocast:
            logits = which(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return logits, (captured[0] if captured else None)

    def reference_run() -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return run(reference)

    def forward_backward(term: str) -> None:
        logits, hidden = run(model)
        if objective is None:  # fine-tuning
            backward(answer_loss(logits, inputs["labels"]))
            return
        if term == "forget_term":
            values = ForgetInputs(logits, inputs["labels"],
                                  reference_run()[0] if objective.forget_needs_reference else None, hidden)
            if hidden is not None:
                values.control_vector = torch.ones(1, 1, hidden.shape[-1])
            if objective.needs_preferred:  # the preferred answers' graph is alive with the forget one's
                values.preferred_logits, values.preferred_labels = run(model)[0], inputs["labels"]
                values.reference_preferred_logits = reference_run()[0]
            backward(objective.forget_term(values))
        else:
            values = RetainInputs(logits, inputs["labels"], hidden=hidden)
            if objective.retain_needs_reference:
                values.reference_logits, values.reference_hidden = reference_run()
            backward(objective.retain_term(values))
        with torch.no_grad():
            answer_loss(logits.detach(), inputs["labels"])  # the trainer's logged loss

    with _fake_mode(mode), tracker:
        # Step 1 (not measured) only creates the optimizer state: gradients of zeros suffice.
        for t in trainables:
            t.param.grad = torch.zeros_like(t.param)
        if optimizer_step:
            if isinstance(optimizer, MaskedSophia):
                optimizer.update_hessian()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master, state = _state_parts(optimizer)
        persistent = weights + reference_bytes + master + state
        tracker.reset_peak()
        forward_backward("forget_term")
        if objective is not None and objective.uses_retain:
            forward_backward("retain_term")
        fwd_bwd_peak = tracker.peak
        gradients = _bytes([t.param.grad for t in trainables if t.param.grad is not None])
        tracker.reset_peak()
        if optimizer_step:
            # As the trainer: only tensors with a gradient (RMU's loss reaches no layer above rmu_layer).
            with_grad = [t for t in trainables if t.param.grad is not None]
            norm = torch.nn.utils.get_total_norm([t.masked_grad() for t in with_grad], norm_type=2.0)
            torch.nn.utils.clip_grads_with_norm_([t.param for t in with_grad], settings.max_grad_norm, norm)
            if isinstance(optimizer, MaskedSophia):
                optimizer.update_hessian()
            optimizer.step()
        optimizer_peak = tracker.peak
    return StepMemory(
        weights=weights, reference=reference_bytes, master=master, optimizer=state, gradients=gradients,
        activations=saved[0], fwd_bwd_peak=fwd_bwd_peak, optimizer_peak=optimizer_peak, trainable=sum(t.numel() for t in trainables),
        trainable_tensors=sum(t.param.numel() for t in trainables),
        **_layer_and_root(model, trainable_ids),
    )


def _simulate_pass(model_config: Any, config: SimuConfig, batch: int, seq_len: int, attribution: bool) -> StepMemory:
    """A forward pass without gradients (evaluation, knockout), or attribution's: every parameter
    frozen, a backward to the scaled activations (here: to the input embeddings)."""
    from simu_core.scoring import token_logprobs

    with _fake_mode() as mode:
        model = _fake_model(model_config, config)
        model.requires_grad_(False)
        inputs = _tokens(batch, seq_len)
    tracker = TensorMemoryTracker()
    weights = tracker.register([*model.parameters(), *model.buffers()])
    model.eval()
    with _fake_mode(mode), tracker:
        if attribution:
            embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
            total = token_logprobs(logits, inputs["labels"])[0].sum()
            activations = tracker.live - weights
            total.backward()
        else:
            with torch.no_grad():
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                token_logprobs(logits, inputs["labels"])
            activations = tracker.peak - weights
        del logits
    return StepMemory(weights=weights, reference=0, master=0, optimizer=0, gradients=0, activations=activations,
                      fwd_bwd_peak=tracker.peak, optimizer_peak=0, trainable=0, **_layer_and_root(model, set()))


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage needs on each of ``devices`` devices."""

    stage: str
    devices: int
    batch: int  # sequences per device per micro-batch
    seq_len: int
    weights: int
    master: int
    optimizer: int
    gradients: int
    activations: int  # with the stage's checkpointing setting
    activations_other: int | None  # with the other setting (None: not applicable)
    peak: int
    gradient_checkpointing: bool = False
    note: str = ""

    def fits(self, device_bytes: float) -> bool:
        """Whether the peak leaves :data:`HEADROOM` of a device of ``device_bytes`` free."""
        return self.peak <= device_bytes * (1 - HEADROOM)


@dataclass
class MemoryPlan:
    """Per stage and device count, the bytes needed per device; plus what the plan assumed."""

    model: str
    parameters: int
    num_layers: int
    neurons_per_layer: list[int]
    vocab_size: int
    method: str
    dtype: str
    seq_len: int
    mask_source: str | None
    device_memory: float
    device_memory_source: str = ""
    devices: int = 1
    trainable: int = 0
    stages: list[StageMemory] = field(default_factory=list)

    def rows(self, stage: str) -> list[StageMemory]:
        """The rows of one stage, by device count."""
        return [row for row in self.stages if row.stage == stage]

    def unlearn(self, devices: int) -> StageMemory | None:
        """The unlearning row for ``devices`` devices (None when not planned)."""
        return next((row for row in self.rows("unlearn") if row.devices == devices), None)

    def smallest_fit(self, stage: str = "unlearn") -> int | None:
        """The fewest planned devices on which a training stage fits (None: none of them)."""
        counts = sorted(row.devices for row in self.rows(stage) if row.fits(self.device_memory))
        return counts[0] if counts else None

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON-able values (bytes)."""
        values = asdict(self)
        values["headroom"] = HEADROOM
        for row, stage in zip(values["stages"], self.stages):
            row["fits"] = stage.fits(self.device_memory)
        return values


def plan_memory(
    config: SimuConfig,
    device_memory: float = 80 * GiB,
    device_counts: Sequence[int] = DEVICE_COUNTS,
    mask: NeuronMask | None = None,
    mask_fraction: float = 0.05,
    seq_len: int | None = None,
    stages: Sequence[str] = ("train", "attribute", "unlearn", "evaluate", "relearn", "attack"),
    device_memory_source: str = "",
) -> MemoryPlan:
    """Plan the run's stages per device (see the module docstring).

    ``mask``: SIMU's mask (e.g. a cached ``mask.parquet``), checked against the model's shape and
    planned by its fraction of neurons; without it, masked methods assume ``mask_fraction`` of each
    layer's neurons. ``seq_len``: tokens per sequence (default ``model.max_length``).
    ``device_counts``: the FSDP sizes planned for fine-tuning and unlearning (plus ``run.devices``). ``train`` is
    planned only when the run fine-tunes (the tiny model or ``model.base``), ``attribute`` only
    for masked methods, ``relearn`` only with ``relearn.enabled`` (one device: the attack is not
    sharded), ``attack`` (the other attacks of ``attacks``, one device) only when one is listed.
    """
    from simu_core.unlearning import get_method

    model_config = architecture_config(config)
    seq_len = seq_len or config.model.max_length
    spec = get_method(config.unlearn.method)
    with _fake_mode():
        probe = _fake_model(_with_layers(model_config, 1), config)
        width = _neurons_per_layer(probe)[0]
    neurons = [width] * _num_layers(model_config)
    mask_source = None
    if spec.needs_mask:
        if mask is not None:
            check_mask_shape(mask, neurons, "the given mask")
            mask_fraction = mask.fraction()
            mask_source = f"given mask ({mask.total()} neurons, {mask_fraction:.1%})"
        else:
            mask_source = f"assumed {mask_fraction:.0%} of each layer's neurons"
    dtype = _DTYPES[config.model.dtype]
    plan = MemoryPlan(
        model=type(probe).__name__, parameters=0, num_layers=len(neurons), neurons_per_layer=neurons,
        vocab_size=model_config.vocab_size, method=spec.name, dtype=config.model.dtype, seq_len=seq_len,
        mask_source=mask_source, device_memory=device_memory, device_memory_source=device_memory_source,
        devices=config.run.devices,
    )
    evaluation = _at_depth(lambda shape: _simulate_pass(shape, config, config.eval.batch_size, seq_len, False),
                           model_config)
    plan.parameters = evaluation.weights // dtype.itemsize  # buffers are negligible next to the weights
    # As simu_core.stages: the tiny model is trained (benchmarks the registry marks tiny_model, no model
    # given), or model.base is fine-tuned; a given target is not (stages is not imported: it would join
    # unlearning's code version).
    from simu_core.benchmarks.info import BENCHMARK_INFO

    tiny = (BENCHMARK_INFO[config.data.benchmark].tiny_model and config.model.base is None
            and config.model.target is None)
    trains = tiny or (config.model.base is not None and config.model.target is None)
    if "train" in stages and trains:
        ckpt = config.model.finetune.gradient_checkpointing
        step = simulate_step(model_config, config, "finetune", seq_len=seq_len)
        other = simulate_step(model_config, config, "finetune", seq_len=seq_len, gradient_checkpointing=not ckpt,
                              optimizer_step=False)
        batch = config.model.finetune.batch_size
        plan.stages.append(_row("train", 1, batch, seq_len, step, other.activations, ckpt,
                                "fine-tuning of the target and the retain reference"))
        plan.stages.extend(_sharded_rows("train", step, other, batch, seq_len, config, device_counts))
    if "attribute" in stages and spec.needs_mask:
        copies = config.attribution.batch_size * config.attribution.steps
        step = _at_depth(lambda shape: _simulate_pass(shape, config, copies, seq_len, True), model_config)
        plan.stages.append(_row("attribute", 1, copies, seq_len, step, None, False,
                                f"{config.attribution.batch_size} items x m={config.attribution.steps} scaled "
                                "copies per pass (fast mode runs them on the upper layers only: an upper bound)"))
    if "unlearn" in stages:
        rows, plan.trainable = _plan_unlearning(model_config, config, seq_len, mask_fraction, device_counts,
                                                evaluation)
        plan.stages.extend(rows)
    if "evaluate" in stages:
        batch = config.eval.batch_size
        cache = _kv_cache_bytes(model_config, batch, seq_len + config.eval.max_new_tokens, dtype)
        generation = evaluation.weights + cache
        row = _row("evaluate", 1, batch, seq_len, evaluation, None, False,
                   "the larger of the scoring pass and greedy generation's KV cache")
        plan.stages.append(StageMemory(**{**asdict(row), "activations": max(row.activations, cache),
                                          "peak": max(row.peak, generation)}))
    if "relearn" in stages and config.relearn.enabled:
        plan.stages.append(_relearn_row(model_config, config, seq_len, evaluation, dtype))
    if "attack" in stages and any(attack != "relearn" for attack in config.attacks):
        plan.stages.append(_attack_row(model_config, config, seq_len, evaluation, dtype))
    return plan


def _attack_row(model_config: Any, config: SimuConfig, seq_len: int, evaluation: StepMemory,
                dtype: torch.dtype) -> StageMemory:
    """The attacks but relearning, on one device; the largest of: the quantization attack (the model and
    its quantized copy, then the evaluation's scoring pass or generation cache), the in-context attack (the
    evaluation at ``k + 1`` times the sequence length: k shown items before each question, an upper
    bound), and the logit lens (the scoring pass plus every layer's hidden states of a batch, float32)."""
    batch = config.eval.batch_size
    measuring = max(evaluation.activations,
                    _kv_cache_bytes(model_config, batch, seq_len + config.eval.max_new_tokens, dtype))
    candidates = {}
    if "quantize" in config.attacks:
        candidates["quantize"] = 2 * evaluation.weights + measuring
    if "in_context" in config.attacks:
        longer = (config.attack.in_context.k + 1) * seq_len
        candidates["in_context"] = evaluation.weights + max(
            evaluation.activations * (config.attack.in_context.k + 1),
            _kv_cache_bytes(model_config, batch, longer + config.eval.max_new_tokens, dtype))
    if "logit_lens" in config.attacks:
        text = getattr(model_config, "get_text_config", lambda: model_config)()
        hidden = _num_layers(text) * batch * seq_len * text.hidden_size * 4
        candidates["logit_lens"] = evaluation.weights + evaluation.activations + hidden
    if "paraphrase" in config.attacks:
        candidates["paraphrase"] = evaluation.weights + measuring
    largest = max(candidates, key=candidates.get)
    row = _row("attack", 1, batch, seq_len, evaluation, None, False,
               f"attacks {sorted(candidates)} one after another; the largest is {largest} (quantize: the model and "
               "its quantized copy; in_context: k shown items lengthen the prompt; logit_lens: every layer's hidden "
               "states); one device")
    return StageMemory(**{**asdict(row), "peak": max(candidates.values())})


def _relearn_row(model_config: Any, config: SimuConfig, seq_len: int, evaluation: StepMemory,
                 dtype: torch.dtype) -> StageMemory:
    """The relearning attack on one device: its training step, or its measurements (the evaluation's
    scoring pass or generation KV cache, whichever is larger) made between steps while the weights,
    masters and moments stay alive (gradients are freed before)."""
    batch = config.relearn.batch_size
    step = simulate_step(model_config, config, "relearn", seq_len=seq_len)
    cache = _kv_cache_bytes(model_config, config.eval.batch_size, seq_len + config.eval.max_new_tokens, dtype)
    measuring = step.weights + step.master + step.optimizer + max(evaluation.activations, cache)
    row = _row("relearn", 1, batch, seq_len, step, None, False,
               "the attack's AdamW step on every parameter, or its measurements with the optimizer state alive; "
               "one device (not sharded)")
    return StageMemory(**{**asdict(row), "peak": max(step.peak, measuring)})


def _row(stage: str, devices: int, batch: int, seq_len: int, step: StepMemory, other: int | None,
         checkpointing: bool, note: str) -> StageMemory:
    return StageMemory(
        stage=stage, devices=devices, batch=batch, seq_len=seq_len, weights=step.weights + step.reference,
        master=step.master, optimizer=step.optimizer, gradients=step.gradients, activations=step.activations,
        activations_other=other, peak=step.peak, gradient_checkpointing=checkpointing, note=note,
    )


def _kv_cache_bytes(model_config: Any, batch: int, tokens: int, dtype: torch.dtype) -> int:
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * _num_layers(text) * batch * tokens * kv_heads * head_dim * dtype.itemsize


def _sharded_rows(stage: str, step: StepMemory, other: StepMemory, batch: int, seq_len: int, config: SimuConfig,
                  device_counts: Sequence[int]) -> list[StageMemory]:
    """FSDP rows of a training stage (fine-tuning or unlearning), one per device count above 1, from
    its one-device step ``step`` (``other``: the step with the other checkpointing setting)."""
    ckpt = (config.unlearn if stage == "unlearn" else config.model.finetune).gradient_checkpointing
    reduce_copy = 4 / _DTYPES[config.model.dtype].itemsize  # the fp32 copy reduce-scattered (simu_core.distributed)
    rows = []
    for devices in sorted({*device_counts, config.run.devices} - {1}):
        local_batch = math.ceil(batch / devices)
        share = local_batch / batch  # activations are linear in the batch
        unsharded = step.root_params + 2 * step.layer_params
        reduce = int(max(step.layer_trainable, step.root_trainable) * (1 + reduce_copy))
        weights = (step.weights + step.reference) // devices + unsharded
        gradients = step.gradients // devices + reduce
        persistent = weights + (step.master + step.optimizer) // devices + gradients
        excess = int(step.backward_excess * share)  # what the forward/backward adds at its peak
        rows.append(StageMemory(
            stage=stage, devices=devices, batch=local_batch, seq_len=seq_len, weights=weights,
            master=step.master // devices, optimizer=step.optimizer // devices, gradients=gradients,
            activations=int(step.activations * share), activations_other=int(other.activations * share),
            peak=persistent + max(excess, step.optimizer_transient // devices), gradient_checkpointing=ckpt,
            note="FSDP: shards, plus the unsharded embeddings/head, two gathered layers, one layer's gradients",
        ))
    return rows


def _plan_unlearning(
    model_config: Any, config: SimuConfig, seq_len: int, mask_fraction: float, device_counts: Sequence[int],
    evaluation: StepMemory | None = None,
) -> tuple[list[StageMemory], int]:
    """Unlearning rows (one device, then FSDP per device count) and the number of trainable coordinates.

    With ``unlearn.stop_at`` the one-device row's peak is also at least the stop checks': the
    evaluation's scoring pass (``evaluation``) made between steps while the weights, masters and
    optimizer state stay alive (gradients are freed before a check)."""
    batch = config.unlearn.batch_size
    ckpt = config.unlearn.gradient_checkpointing
    step = simulate_step(model_config, config, "unlearn", seq_len=seq_len, mask_fraction=mask_fraction)
    other = simulate_step(model_config, config, "unlearn", seq_len=seq_len, mask_fraction=mask_fraction,
                          gradient_checkpointing=not ckpt, optimizer_step=False)
    note = "with the frozen reference model" if step.reference else ""
    row = _row("unlearn", 1, batch, seq_len, step, other.activations, ckpt, note)
    if config.unlearn.stop_at is not None and evaluation is not None:
        # unlearn.stop_refine: an fp32 copy of the trainable tensors across a checked step, two while refining.
        copy = 4 * step.trainable_tensors if config.unlearn.stop_refine else 0
        checking = step.weights + step.reference + step.master + step.optimizer + evaluation.activations + 2 * copy
        refine = "an fp32 copy of the trainable tensors per side of the refined step" if copy else ""
        row = StageMemory(**{**asdict(row), "peak": max(row.peak + copy, checking),
                             "note": "; ".join(filter(None, [note, "the larger of the step and the stop checks' "
                                                                   "scoring pass (eval.batch_size)", refine]))})
    rows = [row]
    rows += _sharded_rows("unlearn", step, other, batch, seq_len, config, device_counts)
    return rows, step.trainable


def device_memory(device: str, override_gib: float | None = None) -> tuple[float, str]:
    """(bytes, description) of the memory a plan compares with: ``override_gib``, else the first
    CUDA device's (``device`` cuda or auto, when one is present), else an 80 GiB accelerator."""
    if override_gib is not None:
        if not override_gib > 0:
            raise PlanError(f"device memory must be > 0 GiB, got {override_gib}")
        return override_gib * GiB, "given"
    if device in ("cuda", "auto") and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return float(properties.total_memory), f"{properties.name}, {torch.cuda.device_count()} here"
    return 80.0 * GiB, "no GPU here: an 80 GiB accelerator; --device-memory GIB to change"


def run_device_memory(config: SimuConfig) -> tuple[float, str]:
    """(bytes, description) of one device of the run itself: the GPU's memory, or for CPU processes
    the machine's RAM divided among ``run.devices`` of them."""
    if config.run.device in ("cuda", "auto") and torch.cuda.is_available():
        return device_memory(config.run.device)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / config.run.devices, f"this machine's RAM / {config.run.devices} CPU process(es)"


_PLANS: dict[tuple, "MemoryPlan | None"] = {}


def check_fits(config: SimuConfig) -> None:
    """Raise :class:`PlanError` naming the numbers when fine-tuning (when the run fine-tunes),
    unlearning or the relearning attack (``relearn.enabled``; one device) cannot fit ``run.devices``
    devices of this machine. Checked for GPU runs and sharded runs (a one-process CPU run is left to the OS).
    A model whose config cannot be read here is not checked (loading it reports that)."""
    on_gpu = config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())
    if config.run.devices < 2 and not on_gpu:
        return
    memory, source = run_device_memory(config)
    # A sweep checks every point: plan each memory-relevant setting once.
    unlearn = config.unlearn.model_dump(include={"method", "batch_size", "gradient_checkpointing", "train_attention",
                                                 "retain_loss", "retain_weight", "forget_weight", "rmu_layer",
                                                 "rmu_alpha"})
    relearn = (config.relearn.model_dump_json(), config.eval.batch_size, config.eval.max_new_tokens) \
        if config.relearn.enabled else None
    key = (config.model.model_dump_json(), json.dumps(unlearn, sort_keys=True), config.data.benchmark,
           config.run.dtype, config.run.devices, memory, relearn)
    if key not in _PLANS:
        try:
            _PLANS[key] = plan_memory(config, device_memory=memory, device_counts=(1, 2, 4, 8, 16, 32, 64),
                                      stages=("train", "unlearn", "relearn"))
        except PlanError:
            _PLANS[key] = None
    plan = _PLANS[key]
    if plan is None:
        return
    for stage, what, batch in (("train", "fine-tuning", "model.finetune"), ("unlearn", "unlearning", "unlearn")):
        row = next((row for row in plan.rows(stage) if row.devices == config.run.devices), None)
        if row is None or row.fits(memory):
            continue
        smallest = plan.smallest_fit(stage)
        smaller = (f"bf16 weights (model.dtype=bfloat16), gradient checkpointing ({batch}.gradient_checkpointing=true) "
                   f"or a smaller {batch}.batch_size")
        if not on_gpu:  # CPU processes share one RAM: more of them do not add memory
            advice = f"the processes share this machine's RAM; use a machine with more, or {smaller}"
        elif smallest is not None:
            advice = f"it fits from run.devices={smallest}"
        else:
            advice = f"it fits none of 1-64 devices: use {smaller}"
        raise PlanError(
            f"{what} {plan.model} ({plan.parameters / 1e9:.3g} B parameters, "
            f"{plan.method + ', ' if stage == 'unlearn' else ''}{plan.dtype}) needs {row.peak / GiB:.1f} GiB per device on "
            f"run.devices={config.run.devices}, and a device here has {memory / GiB:.1f} GiB ({source}; "
            f"{HEADROOM:.0%} kept free): {advice} (see `simu plan`)"
        )
    relearning = plan.rows("relearn")
    if relearning and not relearning[0].fits(memory):
        raise PlanError(
            f"the relearning attack {plan.model} ({plan.parameters / 1e9:.3g} B parameters, {plan.dtype}) needs "
            f"{relearning[0].peak / GiB:.1f} GiB on its one device, and a device here has {memory / GiB:.1f} GiB "
            f"({source}; {HEADROOM:.0%} kept free): the attack (AdamW on every parameter) is not sharded; use a "
            "smaller relearn.batch_size, a larger device, or relearn.enabled=false (see `simu plan`)"
        )


# ----------------------------------------------------------------------------------------------
# output


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table (GiB per device) and a verdict on unlearning."""
    device = f"{plan.device_memory / GiB:.1f} GiB" + (f" ({plan.device_memory_source})" if plan.device_memory_source else "")
    lines = [
        f"model: {plan.model}, {plan.parameters / 1e9:.3g} B parameters, {plan.num_layers} layers, "
        f"{plan.neurons_per_layer[0]} MLP neurons per layer, vocabulary {plan.vocab_size}",
        f"unlearning: {plan.method}, model.dtype {plan.dtype}, {plan.trainable / 1e9:.3g} B trainable coordinates "
        f"({plan.trainable / max(1, plan.parameters):.1%})" + (f"; mask: {plan.mask_source}" if plan.mask_source else ""),
        f"sequences of {plan.seq_len} tokens; device memory {device}; a stage fits when its peak leaves "
        f"{HEADROOM:.0%} free",
        "",
    ]
    header = ("stage", "devices", "batch/device", "weights", "master", "optimizer", "gradients", "activations",
              "act. (other ckpt)", "peak/device", "fits")
    table = [header]
    for row in plan.stages:
        table.append((
            row.stage, str(row.devices), str(row.batch), _gib(row.weights), _gib(row.master), _gib(row.optimizer),
            _gib(row.gradients), _gib(row.activations) + (" ckpt" if row.gradient_checkpointing else ""),
            _gib(row.activations_other) + (" ckpt" if row.activations_other is not None and not row.gradient_checkpointing
                                           else ""),
            _gib(row.peak), "yes" if row.fits(plan.device_memory) else "NO",
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("GiB per device. activations: alive when the backward starts (saved for it, logits, loss; ckpt: "
                 "with gradient checkpointing); peak: the simulated step's, temporaries included.")
    notes = sorted({f"{row.stage}: {row.note}" for row in plan.stages if row.note})
    lines.extend(notes)
    single = plan.unlearn(1)
    if single is not None:
        lines.append("")
        size = f"{plan.device_memory / GiB:.0f} GiB"
        lines.append(f"unlearning on 1 device: {_gib(single.peak)} GiB: "
                     f"{'fits' if single.fits(plan.device_memory) else 'does NOT fit'} one {size} device")
        for row in plan.rows("unlearn")[1:]:
            lines.append(f"unlearning with FSDP on {row.devices} devices: {_gib(row.peak)} GiB per device: "
                         f"{'fits' if row.fits(plan.device_memory) else 'does NOT fit'}")
        smallest = plan.smallest_fit()
        if smallest is None:
            lines.append("unlearning fits none of the planned device counts: use more devices, bf16 weights "
                         "(model.dtype=bfloat16), gradient checkpointing or a smaller batch")
        elif smallest > 1:
            lines.append(f"-> set run.devices={smallest} or more (FSDP), see 'Large models' in the README")
    return "\n".join(lines)
