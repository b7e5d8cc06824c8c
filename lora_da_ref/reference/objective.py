"""The objective (11) and the bound the theorems minimise, split into variance and bias.

For a fixed column-orthonormal ``A`` (d1, r), the constrained MLE ``Ŵ`` over ``W0 + A B`` obeys

    E‖Ŵ − W_tgt‖²_F  =  E‖Ŵ − W^P‖²  +  ‖W^P − W_tgt‖²                       (23), Pythagoras
                     ≈  tr((I⊗A)ᵀJ(I⊗A))⁻¹)/N  +  (‖ΔW‖² − tr(AᵀΔWΔWᵀA))     (26), (43)–(46)
                     ≤  (1/N) Σ_i tr(Aᵀ J⁻¹_[i] A)  +  ‖ΔW‖² − tr(AᵀΔWΔWᵀA)   (27), (48)
                     =  tr(AᵀΩA) + ‖ΔW‖²_F                                       (11)/(19)

with ``W^P = W0 + AAᵀΔW`` (44) and ``ΔW = W_tgt − W0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.checks import as_matrix, check_positive_int
from lora_da_ref.reference.fisher import FisherMatrix, as_fisher

__all__ = [
    "ORTHONORMALITY_TOL",
    "ErrorBound",
    "bias_term",
    "expected_error_bound",
    "projected_fisher",
    "unrelaxed_variance",
    "variance_term",
]

ORTHONORMALITY_TOL = 1e-8  # ‖AᵀA − I‖_max accepted as orthonormal (round-off of QR / eigh)


@dataclass(frozen=True)
class ErrorBound:
    """``total = variance + bias`` = tr(AᵀΩA) + ‖ΔW‖²_F (the bound of Eq. 11)."""

    total: float
    variance: float
    bias: float


def _check_A(A: np.ndarray, d1: int) -> np.ndarray:
    A = as_matrix("A", A, shape=(d1, None))
    gap = np.abs(A.T @ A - np.eye(A.shape[1])).max()
    if gap > ORTHONORMALITY_TOL:
        raise ValueError(f"A must be column-orthonormal (max |AᵀA − I| = {gap:.3g})")
    return A


def variance_term(A: np.ndarray, J: np.ndarray | FisherMatrix, d2: int, n: int) -> float:
    """Relaxed variance ``(1/N) Σ_i tr(Aᵀ J⁻¹_[i] A)``, Eqs. (25), (27), (48)."""
    d1 = np.shape(A)[0]
    A = _check_A(A, d1)
    block_sum = as_fisher(J, d1, d2).inverse_block_sum()  # (d1, d1)
    return float(np.trace(A.T @ block_sum @ A)) / check_positive_int("n", n)


def bias_term(A: np.ndarray, delta_w: np.ndarray) -> float:
    """Squared bias ``‖W^P − W_tgt‖² = ‖ΔW‖² − tr(AᵀΔWΔWᵀA)``, Eqs. (43)–(46)."""
    delta_w = as_matrix("delta_w", delta_w)
    A = _check_A(A, delta_w.shape[0])
    return float(np.sum(delta_w**2) - np.sum((A.T @ delta_w) ** 2))


def expected_error_bound(
    A: np.ndarray, J: np.ndarray | FisherMatrix, delta_w: np.ndarray, n: int
) -> ErrorBound:
    """The bound of Eq. (11) minimised by Theorems 4.1/4.2: ``tr(AᵀΩA) + ‖ΔW‖²_F``.

    Args:
        A: (d1, r) column-orthonormal. J: Fisher of vec(W) at W0. delta_w: ΔW (d1, d2). n: N.
    """
    delta_w = as_matrix("delta_w", delta_w)
    variance = variance_term(A, J, delta_w.shape[1], n)
    bias = bias_term(A, delta_w)
    return ErrorBound(total=variance + bias, variance=variance, bias=bias)


def projected_fisher(A: np.ndarray, J: np.ndarray | FisherMatrix, d2: int) -> np.ndarray:
    """Fisher of ``vec(B)`` for ``W = W0 + A B``: ``(I⊗A)ᵀ J (I⊗A)`` (r·d2, r·d2), Lemma C.2."""
    d1 = np.shape(A)[0]
    IA = np.kron(np.eye(d2), as_matrix("A", A))  # (d1·d2, r·d2) since vec(AB) = (I⊗A) vec(B)
    return IA.T @ as_fisher(J, d1, d2).to_dense() @ IA


def unrelaxed_variance(A: np.ndarray, J: np.ndarray | FisherMatrix, d2: int, n: int) -> float:
    """Asymptotic variance before the Loewner relaxation: ``tr(((I⊗A)ᵀJ(I⊗A))⁻¹)/N``, Eq. (26)."""
    A = _check_A(A, np.shape(A)[0])
    P = projected_fisher(A, J, d2)  # (r·d2, r·d2)
    return float(np.trace(np.linalg.inv(P))) / check_positive_int("n", n)
