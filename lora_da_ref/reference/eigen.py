"""Courant–Fischer eigen-solution of ``min tr(AᵀΩA)`` s.t. ``AᵀA = I_r``, Eqs. (5)–(8)."""

from __future__ import annotations

import numpy as np
from scipy import linalg

from lora_da_ref.reference.checks import as_symmetric, check_rank

__all__ = ["fix_signs", "smallest_eigenpairs", "smallest_eigvecs"]


def smallest_eigenpairs(omega: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The r smallest eigenvalues (ascending, (r,)) and eigenvectors ((d, r)) of symmetric Ω.

    Dense ``scipy.linalg.eigh`` with ``subset_by_index``; columns have a deterministic sign
    (:func:`fix_signs`). The optimum of Eq. (5) is ``λ1 + … + λr`` (Eq. 8).
    """
    omega = as_symmetric("omega", omega)
    r = check_rank(r, omega.shape[0])
    values, vectors = linalg.eigh(omega, subset_by_index=[0, r - 1])  # (r,), (d, r)
    return values, fix_signs(vectors)


def smallest_eigvecs(omega: np.ndarray, r: int) -> np.ndarray:
    """A* = [u1 … ur], minimiser of ``tr(AᵀΩA)`` over ``AᵀA = I_r``, Eqs. (5)–(8). Shape (d, r).

    Unique only up to ``A*·Q`` (Q orthogonal) — compare results as subspaces.
    """
    return smallest_eigenpairs(omega, r)[1]


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive (determinism only)."""
    idx = np.argmax(np.abs(vectors), axis=0)  # (r,)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs
