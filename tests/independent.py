"""Answers to LoRA-DA's initialisation problem computed WITHOUT the library's Ω or eigensolver.

* :func:`expected_error_bound_direct`: the bound (11) ``(1/N) Σ_i tr(Aᵀ J⁻¹_[i] A) + ‖ΔW − AAᵀΔW‖²``
  from a dense inverse and the explicit W^P of Eq. (44) (Pythagoras), ΔW = −J⁻¹ vec(G) by a dense
  solve when not given.
* :func:`brute_force_minimiser`: that bound minimised over the Stiefel manifold by BFGS on
  ``A = qf(X)`` from many random starts (numerical gradients: no formula for Ω is used).
* :func:`diagonal_problem`: a problem whose answer is known in closed form — diagonal J and a G
  with at most one non-zero per column, so ΔW has rows of disjoint support, ΔWΔWᵀ and hence Ω
  are diagonal, and A0 is the coordinate axes of the r smallest diagonal entries (by sorting).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def displacement_direct(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """ΔW = −J⁻¹ vec(G) (column-stacked), by a dense solve."""
    d1, d2 = G.shape
    return -np.linalg.solve(J, G.reshape(-1, order="F")).reshape(d1, d2, order="F")


def variance_matrix_direct(J: np.ndarray, d1: int, d2: int) -> np.ndarray:
    """Σ_i J⁻¹_[i]: the sum of the d1×d1 diagonal blocks of a dense inverse of J."""
    Jinv = np.linalg.inv(J)
    return sum(Jinv[i * d1 : (i + 1) * d1, i * d1 : (i + 1) * d1] for i in range(d2))


def expected_error_bound_direct(
    A: np.ndarray, variance: np.ndarray, delta: np.ndarray, n: int
) -> float:
    """(1/N) tr(Aᵀ (Σ_i J⁻¹_[i]) A) + ‖ΔW − A AᵀΔW‖_F² for orthonormal A (d1, r), Eq. (11)/(19);
    ``variance`` = :func:`variance_matrix_direct`."""
    residual = delta - A @ (A.T @ delta)  # W_tgt − W^P, Eq. (44)
    return float(np.trace(A.T @ variance @ A) / n + np.sum(residual**2))


def brute_force_minimiser(
    J: np.ndarray, delta: np.ndarray, n: int, r: int, *, starts: int = 6, seed: int = 0
) -> tuple[np.ndarray, float]:
    """The best (A, bound) over BFGS runs on A = qf(X) from ``starts`` random X (d1, r)."""
    d1, d2 = delta.shape
    variance = variance_matrix_direct(J, d1, d2)
    rng = np.random.default_rng(seed)

    def orth(x: np.ndarray) -> np.ndarray:
        return np.linalg.qr(x.reshape(d1, r))[0]

    def f(x: np.ndarray) -> float:
        return expected_error_bound_direct(orth(x), variance, delta, n)

    best_x, best_f = None, np.inf
    for _ in range(starts):
        res = minimize(f, rng.standard_normal(d1 * r), method="BFGS", options={"gtol": 1e-9})
        if res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    return orth(best_x), best_f


def diagonal_problem(
    d1: int, d2: int, n: int, r: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(J diagonal (d1·d2,), G (d1, d2), ΔW, A0 (d1, r)) with A0 the closed-form minimiser.

    ``J = diag(j)``; ``G`` has one non-zero per column, in row ``c mod d1`` of column c; so
    ``ΔW = −G / J_mat`` (elementwise, ``J_mat`` = j reshaped column-stacked), ``Σ_i J⁻¹_[i] =
    diag(Σ_c 1/J_mat[:, c])``, ``ΔWΔWᵀ = diag(Σ_c ΔW_ic²)`` and Ω = diag(ω) is diagonal: A0 = the
    axes of the r smallest ω. Sizes of the bias are drawn so that the r smallest of ω differ from
    the r smallest of the variance alone and of variance + bias (the wrong sign).
    """
    rng = np.random.default_rng(seed)
    Jmat = rng.uniform(0.5, 2.0, (d1, d2))  # J_mat[i, c] = J[c·d1 + i, c·d1 + i]
    G = np.zeros((d1, d2))
    for c in range(d2):
        G[c % d1, c] = rng.uniform(1.0, 3.0) * rng.choice([-1.0, 1.0]) / np.sqrt(n)
    delta = -G / Jmat
    omega = (1.0 / Jmat).sum(1) / n - (delta**2).sum(1)  # (d1,) the diagonal of Ω
    order = np.argsort(omega)
    A0 = np.eye(d1)[:, np.sort(order[:r])]
    return np.diag(Jmat.reshape(-1, order="F")), G, delta, A0
