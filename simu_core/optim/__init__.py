"""Optimizers for unlearning: SIMU's masked Sophia."""

from simu_core.optim.sophia import ColumnMask, MaskedSophia, MaskSpec, sample_gnb_labels

__all__ = ["ColumnMask", "MaskSpec", "MaskedSophia", "sample_gnb_labels"]
