"""Loading Hugging Face causal LMs and tokenizers by hub id or local path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a torch.device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA device is available (use run.device=cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return torch.device(device)


def load_causal_lm(
    name_or_path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (safetensors preferred; remote code only when asked)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=None
    )
    return model.to(resolve_device(device))


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token falls back to EOS."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
