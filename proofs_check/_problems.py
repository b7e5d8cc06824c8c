"""Small random test objects shared by the claims (seeded; nothing here is measured)."""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.linalg import random_orthonormal, sym

EPS = float(np.finfo(np.float64).eps)


def random_spd(d: int, rng: np.random.Generator, cond: float = 100.0) -> np.ndarray:
    """SPD (d, d) with eigenvalues log-spaced in [1, cond] and a Haar eigenbasis."""
    Q = random_orthonormal(d, d, rng)  # (d, d)
    return sym((Q * np.geomspace(1.0, cond, d)) @ Q.T)


def random_symmetric(d: int, rng: np.random.Generator) -> np.ndarray:
    """A GOE-like symmetric (d, d) matrix, indefinite with probability ~1."""
    M = rng.standard_normal((d, d))
    return sym(M)


def matrix_with_singular_gap(d1: int, d2: int, rng: np.random.Generator) -> np.ndarray:
    """(d1, d2) with singular values 1, 2, …, min(d1, d2) (gaps of 1: a non-degenerate SVD)."""
    k = min(d1, d2)
    U = random_orthonormal(d1, k, rng)  # (d1, k)
    V = random_orthonormal(d2, k, rng)  # (d2, k)
    return (U * np.arange(k, 0, -1.0)) @ V.T
