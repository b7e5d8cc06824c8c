"""Input validation shared by the NumPy reference: every failure names the offending argument."""

from __future__ import annotations

import numbers

import numpy as np

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


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
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


def _fmt(shape: tuple[int | None, int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
