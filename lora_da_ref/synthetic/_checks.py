"""Argument validation shared by the synthetic models (ValueError/TypeError naming the problem)."""

from __future__ import annotations

import numbers

import numpy as np


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``; ``bool`` is rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def finite_array(name: str, value: object, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as a finite float64 array of the given shape (``None`` = any size)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real numeric array: {exc}") from exc
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = tuple("n" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return arr


def generator(rng: object) -> np.random.Generator:
    """Require a seeded ``numpy.random.Generator`` (no hidden global state)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def check_class_labels(Y: object, n: int, n_classes: int) -> np.ndarray:
    """``Y`` as an int64 array of shape ``(n,)`` with values in ``{0, …, n_classes − 1}``."""
    try:
        arr = np.asarray(Y)
        values = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Y must be a numeric array of class labels: {exc}") from exc
    if arr.shape != (n,):
        raise ValueError(
            f"Y must have shape ({n},) (one class label per row of X), got {arr.shape}"
        )
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError("Y must hold integer class labels")
    if np.any(values < 0) or np.any(values >= n_classes):
        raise ValueError(f"Y labels must lie in {{0, …, {n_classes - 1}}}")
    return values.astype(np.int64)
