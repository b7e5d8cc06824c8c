"""Small linear-algebra helpers shared by the NumPy reference.

Conventions (declared once, used everywhere in ``lora_da_ref``):

* A layer is stored as ``W`` of shape ``(d1, d2)`` = ``(d_in, d_out)``; it computes ``y = Wᵀ x``.
* ``vec`` stacks **columns**: ``vec(W)[i*d1 + a] = W[a, i]``. Column ``i`` holds output unit ``i``.
* Kronecker order: ``vec(x gᵀ) = g ⊗ x``, so a Fisher that factorises is ``J = Y ⊗ Z`` with
  ``Y`` (d2, d2) acting on outputs and ``Z`` (d1, d1) acting on inputs.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

__all__ = ["principal_angles", "random_orthonormal", "sym", "unvec", "vec"]


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
