"""The quantization attack's settings: what is offered and the check :mod:`simu_core.config` runs
(pure Python, importing nothing of simu: every stage's code version covers the config's imports)."""

from __future__ import annotations

#: The bit widths offered.
QUANTIZATION_BITS: tuple[int, ...] = (8, 4)
#: The schemes offered (torchao's weight-only mapping types; simu_core.attacks.quantize has the formulas).
QUANTIZATION_SCHEMES: tuple[str, ...] = ("symmetric", "asymmetric", "symmetric_no_clipping")


def _is_int(value: object) -> bool:
    # bool is an int subclass and 8.0 == 8: neither is a setting anyone meant.
    return isinstance(value, int) and not isinstance(value, bool)


def check_quantization(bits: int, group_size: int | None, scheme: str) -> None:
    """Refuse a setting that is not offered, naming the field (``attack.quantize.bits``,
    ``.group_size``, ``.scheme``) and what is offered. Pure: no model, no torch."""
    if not _is_int(bits) or bits not in QUANTIZATION_BITS:
        raise ValueError(f"attack.quantize.bits={bits!r} is not offered; offered: {list(QUANTIZATION_BITS)}")
    if group_size is not None and (not _is_int(group_size) or group_size < 1):
        raise ValueError(
            f"attack.quantize.group_size={group_size!r} is not offered; offered: a positive integer that divides "
            "every linear layer's input features, or None (one group per output row)"
        )
    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"attack.quantize.scheme={scheme!r} is not offered; offered: {list(QUANTIZATION_SCHEMES)}")
