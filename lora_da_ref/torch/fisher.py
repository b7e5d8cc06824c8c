"""Torch Fisher representations: *which* matrix (the Fisher of vec W) apart from *how it is stored*.

Mirrors :mod:`lora_da_ref.reference.fisher` (same class and method names). Conventions: ``W`` is
(d1, d2) = (d_in, d_out); ``vec`` stacks columns, so in row-major torch ``vec(W) = Wᵀ.reshape(-1)``;
K-FAC's Kronecker order is ``J ≈ Y ⊗ Z`` with ``Y`` (d2, d2) over outputs and ``Z`` (d1, d1) over
inputs. Every representation offers

* ``solve(G)``            — ``unvec(J⁻¹ vec G)`` (Eqs. 16, 21);
* ``inverse_block_sum()`` — ``Σ_i J⁻¹_[i]`` (d1, d1) (Eqs. 19, 48);
* ``to_dense()``          — the explicit (d1·d2, d1·d2) matrix (damping included).

Inversions go through :func:`damped_cholesky`: ``M + λI`` is factorised with
``torch.linalg.cholesky_ex``; when it is not positive definite a ``ValueError`` names the matrix and
the damping (the NumPy reference's contract: a non-PD factor is an error, never silently
re-damped). Linear solves use the Cholesky factor (triangular solves); an explicit inverse is
formed only where the math needs the matrix itself (``Z⁻¹`` in Ω, the diagonal of ``Y⁻¹``).
The caller chooses the precision: the pipeline passes float64 factors
(:mod:`lora_da_ref.torch.factors`), and the damping ``λ`` (absolute, or relative to the
factor's scale via :func:`relative_damping`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = [
    "CholeskyFactor",
    "DenseFisher",
    "FisherMatrix",
    "KroneckerFisher",
    "as_fisher",
    "condition_number",
    "damped_cholesky",
    "relative_damping",
    "unvec",
    "vec",
]


def vec(W: Tensor) -> Tensor:
    """Column-stacking ``vec``: (d1, d2) → (d1·d2,)."""
    return W.mT.reshape(-1)


def unvec(v: Tensor, d1: int, d2: int) -> Tensor:
    """Inverse of :func:`vec`: (d1·d2,) → (d1, d2)."""
    return v.reshape(d2, d1).mT


@dataclass(frozen=True)
class CholeskyFactor:
    """Lower Cholesky factor ``L`` of ``M + damping·I`` (``M`` symmetric), with the damping used."""

    L: Tensor
    damping: float
    norm1: float = math.nan  # ‖M + λI‖₁, kept for the condition number

    def solve(self, B: Tensor) -> Tensor:
        """``(M + λI)⁻¹ B`` by two triangular solves."""
        return torch.cholesky_solve(B, self.L)

    @cached_property
    def _inverse(self) -> Tensor:
        inv = torch.cholesky_inverse(self.L)
        return 0.5 * (inv + inv.mT)

    def inverse(self) -> Tensor:
        """``(M + λI)⁻¹``, symmetrised; computed once per factor (q/k/v and gate/up share Z)."""
        return self._inverse

    def condition_number(self) -> float:
        """``κ₁(M + λI) = ‖M + λI‖₁ ‖(M + λI)⁻¹‖₁`` (LAPACK's measure; ``κ₂ ≤ κ₁ ≤ d·κ₂``)."""
        return self.norm1 * float(torch.linalg.matrix_norm(self.inverse(), ord=1))


def damped_cholesky(M: Tensor, damping: float, *, name: str = "M") -> CholeskyFactor:
    """Cholesky of ``M + λI``; raises when it is not positive definite (never re-damps silently).

    Args:
        M: symmetric (d, d) matrix, e.g. a K-FAC factor ``Z`` or ``Y``.
        damping: ``λ ≥ 0``, absolute (see :func:`relative_damping` for a scale-relative one).
        name: names the matrix in the error message.

    Raises:
        ValueError: ``M`` is not square/finite, or ``M + λI`` is not positive definite.
    """
    _check_square_finite(name, M)
    M = 0.5 * (M + M.mT)  # (d, d)
    lam = float(damping)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    damped = M + lam * eye  # (d, d)
    L, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ValueError(
            f"{name} + λI is not positive definite (λ = {lam:.3g}, {M.dtype}, d = {M.shape[0]}; "
            f"the factorisation fails at row {int(info)}): the statistics are degenerate or the "
            "damping is too small for them; raise the damping"
        )
    return CholeskyFactor(L, lam, float(torch.linalg.matrix_norm(damped, ord=1)))


def relative_damping(M: Tensor, delta: float) -> float:
    """``δ · tr(M)/d``: damping relative to the factor's mean eigenvalue (a (d,) ``M`` is a
    diagonal). Scaling ``M`` by ``c`` scales ``λ`` by ``c``, so ``(M + λI)⁻¹`` scales by ``1/c``
    and Ω's eigenvectors do not move."""
    diagonal = M if M.ndim == 1 else M.diagonal()
    return float(delta) * float(diagonal.mean())


def condition_number(M: Tensor, M_inverse: Tensor) -> float:
    """``κ₁(M) = ‖M‖₁ ‖M⁻¹‖₁`` from an explicit inverse (O(d²)); a vector is a diagonal."""
    if M.ndim == 1:
        return float(M.abs().max() * M_inverse.abs().max())
    norm = lambda A: float(torch.linalg.matrix_norm(A, ord=1))  # noqa: E731
    return norm(M) * norm(M_inverse)


def _check_square_finite(name: str, M: Tensor) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _damped_diagonal(y: Tensor, damping: float, *, name: str = "Y") -> Tensor:
    """``y + λ`` for a diagonal factor; raises when an entry is not positive."""
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    damped = y + float(damping)  # (d,)
    if not bool((damped > 0).all()):
        raise ValueError(
            f"diagonal {name} + λ is not positive (λ = {float(damping):.3g}, min entry "
            f"{float(y.min()):.3g}): the statistics are degenerate or the damping is too small"
        )
    return damped


class FisherMatrix(ABC):
    """A symmetric positive-definite Fisher of ``vec(W)``, ``W`` of shape (d1, d2)."""

    d1: int
    d2: int

    @abstractmethod
    def solve(self, G: Tensor) -> Tensor:
        """``unvec(J⁻¹ vec(G))`` for ``G`` (d1, d2)."""

    @abstractmethod
    def inverse_block_sum(self) -> Tensor:
        """``Σ_{i=1..d2} J⁻¹_[i]`` (d1, d1), Eqs. (19)/(48)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The explicit (d1·d2, d1·d2) matrix."""

    @property
    @abstractmethod
    def damping(self) -> dict[str, float]:
        """The damping actually used per factor (as factorised; never raised silently)."""

    def _check_G(self, G: Tensor) -> Tensor:
        if not isinstance(G, Tensor):
            raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
        if tuple(G.shape) != (self.d1, self.d2):
            raise ValueError(
                f"G must have shape ({self.d1}, {self.d2}) to match J, got {tuple(G.shape)}"
            )
        return G


class DenseFisher(FisherMatrix):
    """The exact Fisher as a dense SPD (d1·d2, d1·d2) tensor, factorised once (damped Cholesky).

    Args:
        J: (d1·d2, d1·d2) Fisher of column-stacked ``vec(W)``.
        d1, d2: the shape of ``W``.
        damping: ``λ`` added to the diagonal of ``J`` (``J + λI`` not positive definite raises).
    """

    def __init__(self, J: Tensor, d1: int, d2: int, damping: float = 0.0) -> None:
        self.d1, self.d2 = _positive_int("d1", d1), _positive_int("d2", d2)
        _check_square_finite("J", J)
        if J.shape[0] != self.d1 * self.d2:
            raise ValueError(
                f"J must be {d1 * d2}×{d1 * d2} for W ({d1}, {d2}), got {tuple(J.shape)}"
            )
        self._chol = damped_cholesky(J, damping, name="J")
        self.J = 0.5 * (J + J.mT) + self._chol.damping * torch.eye(
            J.shape[0], dtype=J.dtype, device=J.device
        )

    @property
    def damping(self) -> dict[str, float]:
        return {"J": self._chol.damping}

    def solve(self, G: Tensor) -> Tensor:
        x = self._chol.solve(vec(self._check_G(G)).unsqueeze(-1)).squeeze(-1)  # (d1·d2,)
        return unvec(x, self.d1, self.d2)

    def inverse_block_sum(self) -> Tensor:
        # J⁻¹ = L⁻ᵀL⁻¹: block i of J⁻¹ is M_iᵀM_i with M_i = columns i·d1…(i+1)·d1 of L⁻¹.
        eye = torch.eye(self.J.shape[0], dtype=self.J.dtype, device=self.J.device)
        Linv = torch.linalg.solve_triangular(self._chol.L, eye, upper=False)  # (n, n)
        blocks = Linv.reshape(-1, self.d2, self.d1)  # (n, d2, d1)
        S = torch.einsum("nia,nib->ab", blocks, blocks)  # (d1, d1)
        return 0.5 * (S + S.mT)

    def to_dense(self) -> Tensor:
        return self.J


class KroneckerFisher(FisherMatrix):
    """K-FAC Fisher ``J = (Y + λ_Y I) ⊗ (Z + λ_Z I)`` (Algorithm 1).

    Args:
        Y: (d2, d2) output factor ``E[s sᵀ]``, or a (d2,) vector for a diagonal ``Y``
            (the official code keeps only diag Y and uses ``1/(y_i + λ)``).
        Z: (d1, d1) input factor ``E[x xᵀ]``, or a precomputed :class:`CholeskyFactor` of it
            (layers reading the same input share one).
        damping: ``λ`` added to both factors' diagonals (``λ_Z``; also ``λ_Y`` unless given).
        y_damping: ``λ_Y`` when it differs from ``λ_Z`` (e.g. relative to each factor's scale).

    Then ``J⁻¹_[i] = [Y⁻¹]_ii Z⁻¹``, ``Σ_i J⁻¹_[i] = tr(Y⁻¹) Z⁻¹`` and ``J⁻¹vec G = vec(Z⁻¹GY⁻¹)``.
    Raises ``ValueError`` naming the factor when a damped factor is not positive definite.
    """

    def __init__(
        self,
        Y: Tensor,
        Z: Tensor | CholeskyFactor,
        damping: float = 0.0,
        *,
        y_damping: float | None = None,
    ) -> None:
        self._Z = Z if isinstance(Z, CholeskyFactor) else damped_cholesky(Z, damping, name="Z")
        self.d1 = self._Z.L.shape[0]
        y_damping = damping if y_damping is None else y_damping
        self.diagonal_Y = isinstance(Y, Tensor) and Y.ndim == 1
        if self.diagonal_Y:
            self._y, self._y_damping = _damped_diagonal(Y, y_damping), float(y_damping)  # (d2,)
            self._Y = None
        else:
            self._Y = damped_cholesky(Y, y_damping, name="Y")
        self.d2 = Y.shape[0]

    @property
    def damping(self) -> dict[str, float]:
        y_damping = self._y_damping if self.diagonal_Y else self._Y.damping
        return {"Z": self._Z.damping, "Y": y_damping}

    @cached_property
    def _conditioning(self) -> dict[str, float]:
        cond_y = (
            condition_number(self._y, self._y.reciprocal())
            if self.diagonal_Y
            else self._Y.condition_number()
        )
        return {"Z": self._Z.condition_number(), "Y": cond_y}

    def conditioning(self) -> dict[str, float]:
        """``κ₁`` of the damped factors ``Z + λ_Z I`` and ``Y + λ_Y I`` (what is inverted)."""
        return dict(self._conditioning)

    def y_inverse_trace(self) -> Tensor:
        """``tr((Y + λI)⁻¹)``; ``Σ_i 1/(y_i + λ)`` for a diagonal ``Y``."""
        if self.diagonal_Y:
            return self._y.reciprocal().sum()
        return self._Y.inverse().diagonal().sum()

    def y_inverse(self) -> Tensor:
        """``(Y + λI)⁻¹`` (d2, d2) of a full Y, cached; a diagonal Y has no matrix to invert."""
        if self.diagonal_Y:
            raise ValueError("y_inverse: Y is diagonal; use 1/(y_i + λ)")
        return self._Y.inverse()

    def z_inverse(self) -> Tensor:
        """``(Z + λI)⁻¹`` (d1, d1), cached."""
        return self._Z.inverse()  # cached by the (possibly shared) Cholesky factor

    def solve(self, G: Tensor) -> Tensor:
        ZinvG = self._Z.solve(self._check_G(G))  # (d1, d2), triangular solves
        if self.diagonal_Y:
            return ZinvG / self._y  # Z⁻¹ G Y⁻¹ with diagonal Y
        return self._Y.solve(ZinvG.mT).mT  # (d1, d2); Y symmetric

    def inverse_block_sum(self) -> Tensor:
        return self.y_inverse_trace() * self.z_inverse()

    def to_dense(self) -> Tensor:
        Z = self._Z.L @ self._Z.L.mT  # (d1, d1), damped
        Y = torch.diag(self._y) if self.diagonal_Y else self._Y.L @ self._Y.L.mT
        return torch.kron(Y, Z)


def as_fisher(J: Tensor | FisherMatrix, d1: int, d2: int) -> FisherMatrix:
    """Wrap a dense ``J`` as :class:`DenseFisher`; check a representation's sizes against (d1, d2)."""
    if isinstance(J, FisherMatrix):
        if (J.d1, J.d2) != (d1, d2):
            raise ValueError(f"J is for W of shape ({J.d1}, {J.d2}), expected ({d1}, {d2})")
        return J
    return DenseFisher(J, d1, d2)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value
