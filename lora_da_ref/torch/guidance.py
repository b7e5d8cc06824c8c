"""Torch versions of the Fisher–gradient and the guidance matrix Ω (same names as
:mod:`lora_da_ref.guidance`).

Shapes follow the paper: ``G``, ``ΔW`` are (d1, d2) = (d_in, d_out); ``J`` is the Fisher of
column-stacked ``vec(W)``, a :class:`~lora_da_ref.torch.fisher.FisherMatrix` or a dense tensor.
"""

from __future__ import annotations

import math

from torch import Tensor

from lora_da_ref.torch.blas import symmetric_update
from lora_da_ref.torch.fisher import FisherMatrix, as_fisher

__all__ = ["fisher_gradient", "guidance_matrix", "inverse_fisher_block_sum"]

FisherLike = Tensor | FisherMatrix


def fisher_gradient(J: FisherLike, G: Tensor) -> Tensor:
    """Fisher–gradient estimate of the displacement, Eqs. (16) and (21).

    .. math:: \\operatorname{vec}(ΔW) = -J(W_0)^{-1} \\operatorname{vec}(G)

    With K-FAC (``J = Y ⊗ Z``, Algorithm 1) this is ``ΔW = −Z⁻¹ G Y⁻¹``.

    Args:
        J: Fisher of vec(W) at W0: a FisherMatrix or a dense (d1·d2, d1·d2) tensor.
        G: mean gradient of the target loss at W0, (d1, d2).

    Returns:
        ΔW ≈ W_tgt − W0, (d1, d2).
    """
    _check_matrix("G", G)
    return -as_fisher(J, *G.shape).solve(G)


def inverse_fisher_block_sum(J: FisherLike, d1: int, d2: int) -> Tensor:
    """``Σ_{i=1..d2} J⁻¹_[i]`` (d1, d1): the variance term of Eq. (19), from Eq. (48).

    ``J⁻¹_[i]`` is the i-th (d1, d1) diagonal block of ``J⁻¹``. With K-FAC it is
    ``tr(Y⁻¹) Z⁻¹`` (Algorithm 1, step 2).
    """
    return as_fisher(J, d1, d2).inverse_block_sum()


def guidance_matrix(
    J: FisherLike,
    delta_w: Tensor,
    n: float,
    *,
    variance_weight: float = 1.0,
    bias_weight: float = 1.0,
) -> Tensor:
    """Initialisation guidance matrix Ω, Eq. (13) (Theorem 4.1) and Eq. (19) (Theorem 4.2).

    .. math:: Ω = \\frac{β}{N} \\sum_{i=1}^{d_2} J^{-1}_{[i]} - α\\, ΔW ΔW^⊤

    Args:
        J: Fisher of vec(W) at W0 (dense tensor or a FisherMatrix).
        delta_w: ΔW (d1, d2), e.g. the Fisher–gradient of Eq. (21).
        n: N, the fine-tuning set size in the Fisher's units (a positive number; see
            :func:`lora_da_ref.torch.diagnostics.fisher_units`).
        variance_weight: β (paper 1; official code 0.03).
        bias_weight: α.

    Returns:
        Ω, symmetric (d1, d1), in general indefinite; A0 = its r smallest eigenvectors (Eqs. 5–8).
    """
    _check_matrix("delta_w", delta_w)
    if isinstance(n, bool) or not isinstance(n, int | float) or not (math.isfinite(n) and n > 0):
        raise ValueError(f"n (N, the fine-tuning set size) must be a positive number, got {n!r}")
    for name, value in (("variance_weight", variance_weight), ("bias_weight", bias_weight)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    d1, d2 = delta_w.shape
    if variance_weight != 0.0:  # β/N · Σ J⁻¹_[i] − α ΔWΔWᵀ in one syrk (C ← αAAᵀ + βC)
        block_sum = inverse_fisher_block_sum(J, d1, d2)  # (d1, d1)
        return symmetric_update(delta_w, -bias_weight, block_sum, variance_weight / n)
    return symmetric_update(delta_w, -bias_weight)  # (d1, d1)


def _check_matrix(name: str, M: object) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(M.shape)}")
