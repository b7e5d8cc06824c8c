"""Fisher representations: *which* matrix (the Fisher of vec W) separate from *how it is stored*.

The theory (Theorems 4.1/4.2) needs three things from the Fisher ``J`` of ``vec(W)``, ``W`` (d1, d2):

* ``solve(G)``            — ``unvec(J⁻¹ vec G)``, for the Fisher–gradient (Eqs. 16, 21);
* ``inverse_block_sum()`` — ``Σ_i J⁻¹_[i]``, the sum of the d2 diagonal (d1, d1) blocks of ``J⁻¹``
  (Eqs. 19, 48);
* ``to_dense()``          — the explicit (d1·d2, d1·d2) matrix, for checks.

:class:`DenseFisher` is exact (the reference); :class:`KroneckerFisher` is K-FAC's ``J ≈ Y ⊗ Z``
(Algorithm 1), with ``Y`` (d2, d2) over outputs — optionally diagonal — and ``Z`` (d1, d1) over
inputs. Kronecker order follows column-stacking ``vec``: ``vec(x gᵀ) = g ⊗ x`` (see :mod:`lora_da_ref.reference.linalg`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy import linalg
from scipy.linalg import lapack

from lora_da_ref.reference.checks import as_symmetric, check_positive_int
from lora_da_ref.reference.linalg import sym, unvec, vec

__all__ = ["DenseFisher", "FisherMatrix", "KroneckerFisher", "as_fisher"]


class FisherMatrix(ABC):
    """A symmetric positive-definite Fisher of ``vec(W)`` with ``W`` of shape (d1, d2)."""

    d1: int
    d2: int

    @abstractmethod
    def solve(self, G: np.ndarray) -> np.ndarray:
        """``unvec(J⁻¹ vec(G))`` for ``G`` (d1, d2)."""

    @abstractmethod
    def inverse_block_sum(self) -> np.ndarray:
        """``Σ_{i=1..d2} J⁻¹_[i]`` (d1, d1), Eqs. (19)/(48)."""

    @abstractmethod
    def to_dense(self) -> np.ndarray:
        """The explicit (d1·d2, d1·d2) matrix."""

    def _check_G(self, G: np.ndarray) -> np.ndarray:
        G = np.asarray(G, dtype=np.float64)
        if G.shape != (self.d1, self.d2):
            raise ValueError(f"G must have shape ({self.d1}, {self.d2}) to match J, got {G.shape}")
        return G


class DenseFisher(FisherMatrix):
    """The exact Fisher as a dense SPD (d1·d2, d1·d2) matrix, factorised once by Cholesky."""

    def __init__(self, J: np.ndarray, d1: int, d2: int) -> None:
        self.d1, self.d2 = check_positive_int("d1", d1), check_positive_int("d2", d2)
        self.J = as_symmetric("J", J, size=self.d1 * self.d2)
        try:
            self._chol = linalg.cholesky(self.J, lower=True)  # J = L Lᵀ
        except linalg.LinAlgError as err:
            raise ValueError("J must be positive definite (Cholesky factorisation failed)") from err
        self._block_sum: np.ndarray | None = None

    def solve(self, G: np.ndarray) -> np.ndarray:
        x = linalg.cho_solve((self._chol, True), vec(self._check_G(G)))  # (d1·d2,)
        return unvec(x, self.d1, self.d2)

    def inverse_block_sum(self) -> np.ndarray:
        # J⁻¹ = L⁻ᵀ L⁻¹, so block i of J⁻¹ is M_iᵀ M_i with M_i the columns i·d1…(i+1)·d1 of L⁻¹.
        # Summing M_iᵀ M_i never forms J⁻¹: ~n³/3 flops for the triangular inverse, n²·d1 for the sum.
        if self._block_sum is None:
            Linv, info = lapack.dtrtri(self._chol, lower=1)  # (n, n) lower triangular
            if info != 0:
                raise ValueError(f"triangular inverse of chol(J) failed (LAPACK info={info})")
            blocks = Linv.reshape(-1, self.d2, self.d1)  # (n, d2, d1): blocks[:, i] = M_i
            self._block_sum = sym(np.einsum("nia,nib->ab", blocks, blocks))  # (d1, d1)
        return self._block_sum

    def to_dense(self) -> np.ndarray:
        return self.J


class KroneckerFisher(FisherMatrix):
    """K-FAC Fisher ``J = Y ⊗ Z`` (Algorithm 1).

    Args:
        Y: (d2, d2) SPD output factor ``E[g gᵀ]``, or a (d2,) positive vector for a diagonal ``Y``
            (the official code keeps only diag Y).
        Z: (d1, d1) SPD input factor ``E[x xᵀ]``.

    Then ``J⁻¹_[i] = [Y⁻¹]_ii Z⁻¹``, ``Σ_i J⁻¹_[i] = tr(Y⁻¹) Z⁻¹`` and ``J⁻¹ vec G = vec(Z⁻¹ G Y⁻¹)``.
    """

    def __init__(self, Y: np.ndarray, Z: np.ndarray) -> None:
        self.Z = as_symmetric("Z", Z)
        self.d1 = self.Z.shape[0]
        Y = np.asarray(Y, dtype=np.float64)
        self.diagonal_Y = Y.ndim == 1
        if self.diagonal_Y:
            if not (np.all(np.isfinite(Y)) and np.all(Y > 0)):
                raise ValueError("diagonal Y must be finite and strictly positive")
            self.Y = Y
        else:
            self.Y = as_symmetric("Y", Y)
        self.d2 = self.Y.shape[0]
        self._Z_chol = _cholesky("Z", self.Z)
        self._Y_chol = None if self.diagonal_Y else _cholesky("Y", self.Y)

    def _Y_inv(self) -> np.ndarray:
        if self.diagonal_Y:
            return np.diag(1.0 / self.Y)
        return linalg.cho_solve((self._Y_chol, True), np.eye(self.d2))

    def solve(self, G: np.ndarray) -> np.ndarray:
        ZinvG = linalg.cho_solve((self._Z_chol, True), self._check_G(G))  # (d1, d2)
        if self.diagonal_Y:
            return ZinvG / self.Y  # Z⁻¹ G Y⁻¹ with diagonal Y
        return linalg.cho_solve((self._Y_chol, True), ZinvG.T).T  # (d1, d2); Y symmetric

    def inverse_block_sum(self) -> np.ndarray:
        Zinv = linalg.cho_solve((self._Z_chol, True), np.eye(self.d1))  # (d1, d1)
        return sym(np.trace(self._Y_inv()) * Zinv)

    def to_dense(self) -> np.ndarray:
        Y = np.diag(self.Y) if self.diagonal_Y else self.Y
        return np.kron(Y, self.Z)


def _cholesky(name: str, M: np.ndarray) -> np.ndarray:
    try:
        return linalg.cholesky(M, lower=True)
    except linalg.LinAlgError as err:
        raise ValueError(
            f"{name} must be positive definite (Cholesky factorisation failed)"
        ) from err


def as_fisher(J: np.ndarray | FisherMatrix, d1: int, d2: int) -> FisherMatrix:
    """Wrap a dense ``J`` as :class:`DenseFisher`; check a representation's sizes against (d1, d2)."""
    if isinstance(J, FisherMatrix):
        if (J.d1, J.d2) != (d1, d2):
            raise ValueError(f"J is for W of shape ({J.d1}, {J.d2}), expected ({d1}, {d2})")
        return J
    return DenseFisher(J, d1, d2)
