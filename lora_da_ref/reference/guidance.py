"""The guidance matrix Ω of Theorems 4.1/4.2 and the Fisher–gradient displacement.

Shapes follow the paper: ``W``, ``G``, ``ΔW`` are (d1, d2) = (d_in, d_out); ``J`` is the Fisher of
column-stacked ``vec(W)``, given densely or as a :class:`~lora_da_ref.reference.fisher.FisherMatrix`.
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.checks import as_matrix, check_finite_scalar, check_positive_int
from lora_da_ref.reference.fisher import FisherMatrix, as_fisher
from lora_da_ref.reference.linalg import sym

__all__ = ["fisher_gradient", "guidance_matrix", "inverse_fisher_block_sum"]

FisherLike = np.ndarray | FisherMatrix


def fisher_gradient(J: FisherLike, G: np.ndarray) -> np.ndarray:
    """Fisher–gradient estimate of the displacement, Eqs. (16) and (21).

    .. math:: \\operatorname{vec}(ΔW) = -J(W_0)^{-1} \\operatorname{vec}(G)

    Args:
        J: Fisher of vec(W) at W0, (d1·d2, d1·d2) or a FisherMatrix.
        G: mean gradient of the target loss at W0, (d1, d2).

    Returns:
        ΔW ≈ W_tgt − W0, (d1, d2).
    """
    G = as_matrix("G", G)
    return -as_fisher(J, *G.shape).solve(G)


def inverse_fisher_block_sum(J: FisherLike, d1: int, d2: int) -> np.ndarray:
    """``Σ_{i=1..d2} J⁻¹_[i]`` (d1, d1): the variance term of Eq. (19), from Eq. (48).

    ``J⁻¹_[i]`` is the i-th (d1, d1) diagonal block of ``J⁻¹`` (rows/cols i·d1 … (i+1)·d1 − 1),
    the inverse-Fisher covariance of output column ``W_(:,i)``.
    """
    d1, d2 = check_positive_int("d1", d1), check_positive_int("d2", d2)
    return as_fisher(J, d1, d2).inverse_block_sum()


def guidance_matrix(
    J: FisherLike,
    delta_w: np.ndarray,
    n: int,
    *,
    variance_weight: float = 1.0,
    bias_weight: float = 1.0,
) -> np.ndarray:
    """Initialisation guidance matrix Ω, Eq. (13) (d2 = 1, Theorem 4.1) and Eq. (19) (Theorem 4.2).

    .. math:: Ω = \\frac{β}{N} \\sum_{i=1}^{d_2} J^{-1}_{[i]} - α\\, ΔW ΔW^⊤

    Args:
        J: Fisher of vec(W) at W0 (dense or a FisherMatrix).
        delta_w: ΔW = W_tgt − W0 (or its Fisher–gradient estimate, Eq. 21), (d1, d2).
        n: N, the number of fine-tuning samples.
        variance_weight: β (paper 1; the official code uses 0.03; 0 = "w/o variance" ablation).
        bias_weight: α (paper 1; 0 = "w/o bias" ablation).

    Returns:
        Ω, symmetric (d1, d1) and in general indefinite. A0 = its r smallest eigenvectors (Eq. 5–8).
    """
    delta_w = as_matrix("delta_w", delta_w)
    n = check_positive_int("n", n)
    beta = check_finite_scalar("variance_weight", variance_weight)
    alpha = check_finite_scalar("bias_weight", bias_weight)
    d1, d2 = delta_w.shape
    omega = -alpha * (delta_w @ delta_w.T)  # (d1, d1)
    if beta != 0.0:
        omega += (beta / n) * inverse_fisher_block_sum(J, d1, d2)
    return sym(omega)
