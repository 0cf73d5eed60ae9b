"""Optimizers: SIMU's masked Sophia and AdamW, both with fp32 state and fp32 masters for bf16/fp16 params."""

from simu_core.optim.adamw import MasterAdamW
from simu_core.optim.sophia import ColumnMask, MaskedSophia, MaskSpec, sample_gnb_labels

__all__ = ["ColumnMask", "MaskSpec", "MaskedSophia", "MasterAdamW", "sample_gnb_labels"]
