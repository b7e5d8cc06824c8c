"""Linear-algebra conventions and helpers of the NumPy reference (public: the torch path, the
checks, the figures and the tests use them too).

Conventions (declared once, used everywhere in ``lora_da_ref``):

* A layer is stored as ``W`` of shape ``(d1, d2)`` = ``(d_in, d_out)``; it computes ``y = Wᵀ x``.
* ``vec`` stacks **columns**: ``vec(W)[i*d1 + a] = W[a, i]``. Column ``i`` holds output unit ``i``.
* Kronecker order: ``vec(x gᵀ) = g ⊗ x``, so a Fisher that factorises is ``J = Y ⊗ Z`` with
  ``Y`` (d2, d2) acting on outputs and ``Z`` (d1, d1) acting on inputs.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

__all__ = ["kron_average", "principal_angles", "random_orthonormal", "sym", "unvec", "vec"]


def vec(W: np.ndarray) -> np.ndarray:
    """Column-stacking ``vec``: ``(d1, d2) -> (d1*d2,)``."""
    return np.asarray(W).reshape(-1, order="F")


def unvec(v: np.ndarray, d1: int, d2: int) -> np.ndarray:
    """Inverse of :func:`vec`: ``(d1*d2,) -> (d1, d2)``."""
    return np.asarray(v).reshape(d1, d2, order="F")


def sym(M: np.ndarray) -> np.ndarray:
    """Symmetric part ``(M + Mᵀ)/2`` (removes round-off asymmetry)."""
    return 0.5 * (M + M.T)


def random_orthonormal(d: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed point of the Stiefel manifold ``{A ∈ R^{d×r}: AᵀA = I}``."""
    Q, R = np.linalg.qr(rng.standard_normal((d, r)))  # (d, r), (r, r)
    return Q * np.sign(np.diag(R))  # sign fix makes the draw exactly Haar


def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between ``col(A)`` and ``col(B)``.

    Eigen-solutions are only defined up to ``A·Q`` with ``Q`` orthogonal, so subspaces are
    compared through these angles, never column by column.
    """
    return np.sort(linalg.subspace_angles(A, B))


def kron_average(Lam: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``(1/n) Σ_n Λ_n ⊗ x_n x_nᵀ`` as a dense ``(d2·d, d2·d)`` matrix (column-stacking order).

    Entry ``[i·d + a, j·d + b] = mean_n Λ_n[i, j] x_n[a] x_n[b]``.

    Args:
        Lam: ``Λ_n``, shape ``(n, d2, d2)``.
        X: ``x_n``, shape ``(n, d)``.
    """
    n, d = X.shape
    d2 = Lam.shape[1]
    XX = (X[:, :, None] * X[:, None, :]).reshape(n, d * d)  # (n, d·d): x_n[a] x_n[b]
    J = Lam.reshape(n, d2 * d2).T @ XX / n  # (d2·d2, d·d): [(i, j), (a, b)], one GEMM
    J = J.reshape(d2, d2, d, d).transpose(0, 2, 1, 3)  # (i, a, j, b)
    return sym(J.reshape(d2 * d, d2 * d))
