"""Activation (gradient) checkpointing of a Hugging Face model for a block of code."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["disable_gradient_checkpointing", "enable_gradient_checkpointing", "gradient_checkpointing"]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch on transformers' non-reentrant checkpointing of every decoder layer (see below)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch it off, with the hook that makes the input embeddings require a gradient."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Transformers' activation (gradient) checkpointing of every decoder layer inside the block.

    Non-reentrant ``torch.utils.checkpoint`` (transformers' default): a layer's forward is run again
    in the backward instead of keeping its activations, with the RNG state of the first run, so
    the gradients are those of a run without it (bit for bit on CPU, ``tests/test_checkpointing.py``).
    Transformers checkpoints in training mode only. Switched off again on exit.
    """
    if not enabled:
        yield
        return
    enable_gradient_checkpointing(model)
    try:
        yield
    finally:
        disable_gradient_checkpointing(model)
