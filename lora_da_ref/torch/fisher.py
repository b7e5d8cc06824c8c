"""Torch Fisher representations: *which* matrix (the Fisher of vec W) apart from *how it is stored*.

Mirrors :mod:`lora_da_ref.fisher` (same class and method names). Conventions: ``W`` is
(d1, d2) = (d_in, d_out); ``vec`` stacks columns, so in row-major torch ``vec(W) = Wᵀ.reshape(-1)``;
K-FAC's Kronecker order is ``J ≈ Y ⊗ Z`` with ``Y`` (d2, d2) over outputs and ``Z`` (d1, d1) over
inputs. Every representation offers

* ``solve(G)``            — ``unvec(J⁻¹ vec G)`` (Eqs. 16, 21);
* ``inverse_block_sum()`` — ``Σ_i J⁻¹_[i]`` (d1, d1) (Eqs. 19, 48);
* ``to_dense()``          — the explicit (d1·d2, d1·d2) matrix (damping included).

Inversions go through :func:`damped_cholesky`: ``M + λI`` is factorised with
``torch.linalg.cholesky_ex``; when the factorisation fails (info ≠ 0) ``λ`` is raised tenfold and the
attempt repeated. The damping actually used is recorded in ``.damping`` — the failure flag is never
ignored.
"""

from __future__ import annotations

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
    "damped_cholesky",
    "unvec",
    "vec",
]

MAX_DAMPING_RAISES = 12  # λ → 10λ at most 12 times: from 1e-6·scale to 1e6·scale, then give up
DAMPING_SEED_EPS = 100  # when λ = 0 fails, restart at 100·eps·mean|diag| (round-off level)


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
    requested_damping: float

    def solve(self, B: Tensor) -> Tensor:
        """``(M + λI)⁻¹ B``."""
        return torch.cholesky_solve(B, self.L)

    @cached_property
    def _inverse(self) -> Tensor:
        inv = torch.cholesky_inverse(self.L)
        return 0.5 * (inv + inv.mT)

    def inverse(self) -> Tensor:
        """``(M + λI)⁻¹``, symmetrised; computed once per factor (q/k/v and gate/up share Z)."""
        return self._inverse


def damped_cholesky(M: Tensor, damping: float, *, name: str = "M") -> CholeskyFactor:
    """Cholesky of ``M + λI``; on failure ``λ ← 10λ`` (recorded), never ignoring the info flag.

    Args:
        M: symmetric (d, d) matrix, e.g. a K-FAC factor ``Z`` or ``Y``.
        damping: requested ``λ ≥ 0``.
        name: used in the error message.

    Raises:
        ValueError: ``M`` is not square/finite, or still not positive definite after
            ``MAX_DAMPING_RAISES`` tenfold raises.
    """
    _check_square_finite(name, M)
    M = 0.5 * (M + M.mT)  # (d, d)
    lam = float(damping)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for _ in range(MAX_DAMPING_RAISES + 1):
        L, info = torch.linalg.cholesky_ex(M + lam * eye)
        if int(info) == 0:
            return CholeskyFactor(L, lam, float(damping))
        lam = 10.0 * lam if lam > 0 else _seed_damping(M)
    raise ValueError(
        f"{name} + λI is not positive definite even with λ = {lam / 10:.3g} "
        f"(requested {damping:.3g}); the statistics are degenerate"
    )


def _seed_damping(M: Tensor) -> float:
    scale = float(M.diagonal().abs().mean())
    return DAMPING_SEED_EPS * torch.finfo(M.dtype).eps * max(scale, 1.0)


def _check_square_finite(name: str, M: Tensor) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _damped_diagonal(y: Tensor, damping: float, *, name: str = "Y") -> tuple[Tensor, float]:
    """``y + λ`` for a diagonal factor; raises ``λ`` tenfold while any entry is ≤ 0."""
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    lam = float(damping)
    for _ in range(MAX_DAMPING_RAISES + 1):
        if bool((y + lam > 0).all()):
            return y + lam, lam
        lam = 10.0 * lam if lam > 0 else _seed_damping(torch.diag(y))
    raise ValueError(f"diagonal {name} + λ is not positive even with λ = {lam / 10:.3g}")


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
        """The damping actually used per factor (after any tenfold raises)."""

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
        damping: ``λ`` added to the diagonal of ``J`` (raised tenfold if Cholesky fails).
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
    """K-FAC Fisher ``J = (Y + λI) ⊗ (Z + λI)`` (Algorithm 1).

    Args:
        Y: (d2, d2) output factor ``E[s sᵀ]``, or a (d2,) vector for a diagonal ``Y``
            (the official code keeps only diag Y and uses ``1/(y_i + λ)``).
        Z: (d1, d1) input factor ``E[x xᵀ]``, or a precomputed :class:`CholeskyFactor` of it
            (layers reading the same input share one).
        damping: ``λ`` added to both factors' diagonals (raised tenfold if a factorisation fails).

    Then ``J⁻¹_[i] = [Y⁻¹]_ii Z⁻¹``, ``Σ_i J⁻¹_[i] = tr(Y⁻¹) Z⁻¹`` and ``J⁻¹vec G = vec(Z⁻¹GY⁻¹)``.
    """

    def __init__(self, Y: Tensor, Z: Tensor | CholeskyFactor, damping: float = 0.0) -> None:
        self._Z = Z if isinstance(Z, CholeskyFactor) else damped_cholesky(Z, damping, name="Z")
        self.d1 = self._Z.L.shape[0]
        self.diagonal_Y = isinstance(Y, Tensor) and Y.ndim == 1
        if self.diagonal_Y:
            self._y, self._y_damping = _damped_diagonal(Y, damping)  # (d2,)
            self._Y = None
        else:
            self._Y = damped_cholesky(Y, damping, name="Y")
        self.d2 = Y.shape[0]

    @property
    def damping(self) -> dict[str, float]:
        y_damping = self._y_damping if self.diagonal_Y else self._Y.damping
        return {"Z": self._Z.damping, "Y": y_damping}

    def y_inverse_trace(self) -> Tensor:
        """``tr((Y + λI)⁻¹)``; ``Σ_i 1/(y_i + λ)`` for a diagonal ``Y``."""
        if self.diagonal_Y:
            return self._y.reciprocal().sum()
        return self._Y.inverse().diagonal().sum()

    def z_inverse(self) -> Tensor:
        """``(Z + λI)⁻¹`` (d1, d1), cached."""
        return self._Z.inverse()  # cached by the (possibly shared) Cholesky factor

    def solve(self, G: Tensor) -> Tensor:
        # Z⁻¹ is needed anyway for Ω (Eq. 19) and is shared by q/k/v or gate/up: one GEMM here
        # is ~3× faster than two triangular solves with d2 right-hand sides.
        ZinvG = self.z_inverse() @ self._check_G(G)  # (d1, d2)
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
