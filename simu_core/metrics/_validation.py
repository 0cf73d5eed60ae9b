"""Shared input checks for the metric functions.

Every public metric validates its inputs with these helpers so that bad data fails loudly with a
message naming the argument (and, for per-item values, the first offending index) instead of
silently producing NaN or a misleading aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Sized
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def first_nonfinite_index(arr: np.ndarray) -> tuple[int, ...] | None:
    """Return the index of the first NaN/inf entry of ``arr`` (as a tuple), or None."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    idx = np.argwhere(bad)[0]
    return tuple(int(i) for i in idx)


def _fmt_index(idx: tuple[int, ...]) -> str:
    return str(idx[0]) if len(idx) == 1 else str(list(idx))


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise ValueError if ``arr`` holds NaN or +/-inf, naming ``name`` and the first bad index."""
    idx = first_nonfinite_index(arr)
    if idx is not None:
        raise ValueError(
            f"{name} contains a non-finite value ({arr[idx]!r}) at index {_fmt_index(idx)}"
        )


def as_float_array(values: ArrayLike, name: str, *, ndim: int = 1) -> np.ndarray:
    """Convert ``values`` to a non-empty, finite float64 array with exactly ``ndim`` dimensions."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be numeric, got a string")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} could not be converted to a float array of ndim {ndim}: {exc}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.size == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if ndim == 2 and arr.shape[1] == 0:
        raise ValueError(f"{name} has rows with no entries (shape {arr.shape})")
    check_finite(arr, name)
    return arr


def as_rows(values: ArrayLike | Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    """Convert a (possibly ragged) sequence of non-empty numeric rows to a list of 1-D float arrays.

    Accepts a 2-D array or a list of lists whose rows may differ in length (e.g. a varying number of
    perturbed answers per item). Each row must be non-empty and finite.
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"{name} must be 2-dimensional (items x options), got shape {values.shape}")
        rows_in: Sequence[Any] = list(values)
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a 2-D array or a sequence of sequences")
        rows_in = values
    if len(rows_in) == 0:
        raise ValueError(f"{name} is empty")
    rows: list[np.ndarray] = []
    for i, row in enumerate(rows_in):
        if isinstance(row, (str, bytes)):
            raise TypeError(f"{name}[{i}] must be a sequence of numbers, got a string")
        try:
            arr = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}[{i}] could not be converted to floats: {exc}") from exc
        if arr.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-dimensional, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name}[{i}] is empty")
        idx = first_nonfinite_index(arr)
        if idx is not None:
            raise ValueError(
                f"{name} contains a non-finite value ({arr[idx]!r}) at index [{i}, {idx[0]}]"
            )
        rows.append(arr)
    return rows


def as_bool_array(values: ArrayLike, name: str) -> np.ndarray:
    """Convert ``values`` to a non-empty 1-D bool array; only bools or 0/1 are accepted."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must hold booleans, got dtype {arr.dtype}")
    farr = arr.astype(np.float64)
    check_finite(farr, name)
    bad = np.flatnonzero((farr != 0) & (farr != 1))
    if bad.size:
        raise ValueError(f"{name} must hold booleans (0/1), got {arr[bad[0]]!r} at index {int(bad[0])}")
    return farr.astype(bool)


def check_same_length(a: Sized, a_name: str, b: Sized, b_name: str) -> None:
    """Raise ValueError if ``a`` and ``b`` (per-item containers) differ in length."""
    if len(a) != len(b):
        raise ValueError(
            f"{a_name} and {b_name} must have the same length (one entry per item), "
            f"got {len(a)} and {len(b)}"
        )


def check_scalar(
    value: float,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
) -> float:
    """Return ``value`` as a float after checking it is a finite real number within [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x!r}")
    if hi is not None and x > hi:
        raise ValueError(f"{name} must be <= {hi}, got {x!r}")
    return x


def check_in_range(arr: np.ndarray, name: str, *, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError naming the first index of ``arr`` outside [lo, hi]."""
    if lo is not None:
        bad = np.flatnonzero(arr < lo)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name} must be >= {lo}, got {arr[i]!r} at index {i}")
    if hi is not None:
        bad = np.flatnonzero(arr > hi)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name} must be <= {hi}, got {arr[i]!r} at index {i}")


def check_text(value: object, name: str, *, allow_empty: bool = True) -> str:
    """Return ``value`` if it is a str (optionally non-blank), else raise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty")
    return value

