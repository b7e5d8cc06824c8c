"""Input validation of the NumPy reference and its synthetic models.

Every failure is a ``TypeError`` (wrong kind of object) or a ``ValueError`` (wrong value) whose
message names the offending argument.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "SYMMETRY_RTOL",
    "as_array",
    "as_matrix",
    "as_symmetric",
    "check_class_labels",
    "check_finite_scalar",
    "check_generator",
    "check_positive_int",
    "check_rank",
]

SYMMETRY_RTOL = 1e-8  # relative asymmetry tolerated in a "symmetric" input (round-off of sums)


def as_matrix(
    name: str, M: object, shape: tuple[int | None, int | None] | None = None
) -> np.ndarray:
    """Return ``M`` as a finite 2-D float64 array, checking its shape (``None`` = any)."""
    if isinstance(M, bool) or not isinstance(M, np.ndarray | list | tuple | numbers.Number):
        raise TypeError(f"{name} must be an array, got {type(M).__name__}")
    arr = np.asarray(M, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and arr.shape[axis] != want:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return arr


def as_symmetric(name: str, M: object, size: int | None = None) -> np.ndarray:
    """A finite, square, symmetric float64 matrix (asymmetry ≤ SYMMETRY_RTOL · ‖M‖)."""
    arr = as_matrix(name, M)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square, got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name} must be {size}×{size}, got shape {arr.shape}")
    scale = max(np.abs(arr).max(), np.finfo(float).tiny)
    if np.abs(arr - arr.T).max() > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric (max |M - Mᵀ| = {np.abs(arr - arr.T).max():.3g})"
        )
    return arr


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum`` (default: positive); ``bool`` is rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        need = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {need}, got {value}")
    return int(value)


def check_rank(r: object, d1: int) -> int:
    """LoRA rank ``r`` with ``1 ≤ r ≤ d1``."""
    r = check_positive_int("r", r)
    if r > d1:
        raise ValueError(f"r must satisfy 1 <= r <= d1 = {d1}, got r = {r}")
    return r


def check_finite_scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def as_array(name: str, value: object, shape: tuple[int | None, ...]) -> np.ndarray:
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


def check_generator(rng: object) -> np.random.Generator:
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


def _fmt(shape: tuple[int | None, int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
