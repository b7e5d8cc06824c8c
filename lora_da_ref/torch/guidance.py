"""Torch versions of the Fisher–gradient and the guidance matrix Ω (same names as
:mod:`lora_da_ref.reference.guidance`), and Ω of one layer as the configuration asks for it (Eq. 19 with
the config's β, α, N, estimator and σ-normalisation: :func:`layer_guidance`).

Shapes follow the paper: ``G``, ``ΔW`` are (d1, d2) = (d_in, d_out); ``J`` is the Fisher of
column-stacked ``vec(W)``, a :class:`~lora_da_ref.torch.fisher.FisherMatrix` or a dense tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_da_ref.torch.blas import gram_lower, symmetric_update
from lora_da_ref.torch.config import LoraDAConfig, SolveConfig
from lora_da_ref.torch.fisher import FisherMatrix, as_fisher

__all__ = [
    "Guidance",
    "calibration_noise",
    "estimator_weights",
    "fisher_gradient",
    "guidance_from_delta",
    "guidance_matrix",
    "inverse_fisher_block_sum",
    "layer_guidance",
    "top_singular_value",
]

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


@dataclass
class Guidance:
    """ΔW (d1, d2) (divided by σ when normalising), Ω (d1, d1) and σ (1.0 when not normalising);
    ``Ω = variance_coefficient · Σ_i J⁻¹_[i] − bias_weight · ΔWΔWᵀ`` (the coefficient is
    ``β/(N σ²)``, the weights those of ``config.estimator``)."""

    delta_w: Tensor
    omega: Tensor
    sigma: float
    variance_coefficient: float = math.nan
    bias_weight: float = math.nan


def layer_guidance(
    J: FisherMatrix,
    G: Tensor,
    config: SolveConfig | LoraDAConfig,
    name: str = "W",
    sample_size: float | None = None,
) -> Guidance:
    """Eqs. (21) and (19) with the config's β, α, N, estimator and σ-normalisation, for any
    Fisher ``J`` (K-FAC or dense), G (d1, d2); ``sample_size``: |S| (needed unless
    ``config.estimator == "plugin"``)."""
    return guidance_from_delta(J, fisher_gradient(J, G), config, name, sample_size)


def guidance_from_delta(
    J: FisherMatrix,
    delta_w: Tensor,
    config: SolveConfig | LoraDAConfig,
    name: str = "W",
    sample_size: float | None = None,
) -> Guidance:
    """Eq. (19) and the σ-normalisation from a given unnormalised ``ΔW`` (d1, d2)."""
    beta, alpha = estimator_weights(J, delta_w, config, sample_size)
    sigma = top_singular_value(delta_w, name) if config.normalize_delta else 1.0
    delta_w = delta_w / sigma
    omega = guidance_matrix(
        J, delta_w, config.n_train, variance_weight=beta / sigma**2, bias_weight=alpha
    )  # (d1, d1)
    return Guidance(delta_w, omega, sigma, beta / sigma**2 / config.n_train, alpha)


def estimator_weights(
    J: FisherMatrix,
    delta_w: Tensor,
    config: SolveConfig | LoraDAConfig,
    sample_size: float | None,
) -> tuple[float, float]:
    """(β, α) of Eq. (19) for ``config.estimator`` (:class:`LoraDAConfig`), from the
    unnormalised ``ΔŴ`` (d1, d2) and |S|: ``"plugin"`` (β, α); ``"debiased"``
    (β(1 + N/|S|), α); ``"damped"`` (β, α·max(0, 1 − tr(Σ_i Ĵ⁻¹_[i])/(|S|‖ΔŴ‖²)))."""
    beta, alpha = config.variance_weight, config.bias_weight
    if config.estimator == "plugin":
        return beta, alpha
    if sample_size is None or not sample_size > 0:
        raise ValueError(
            f"estimator={config.estimator!r} needs the calibration sample size |S| > 0, "
            f"got {sample_size!r}"
        )
    if config.estimator == "debiased":
        return beta * (1.0 + config.n_train / sample_size), alpha
    noise = calibration_noise(J, sample_size)  # tr(Σ_i Ĵ⁻¹_[i])/|S|
    signal = float((delta_w * delta_w).sum())
    fraction = max(0.0, 1.0 - noise / signal) if signal > 0 else 0.0
    return beta, alpha * fraction


def calibration_noise(J: FisherMatrix, sample_size: float) -> float:
    """``tr(Σ_i Ĵ⁻¹_[i]) / |S|``: the expected ``‖ΔŴ − ΔW‖²_F`` from calibration noise (claim 14;
    :mod:`lora_da_ref.torch.diagnostics`); the ``"damped"`` estimator's noise term."""
    return float(J.inverse_block_sum().diagonal().sum()) / sample_size


def top_singular_value(delta_w: Tensor, name: str = "W") -> float:
    """σ_max(ΔW) as √λ_max of the smaller Gram matrix: 2–6× faster than a full SVD here, and as
    accurate for the top singular value (λ_max of MᵀM has relative error O(eps))."""
    small = delta_w.mT if delta_w.shape[0] >= delta_w.shape[1] else delta_w  # (k, ·), k ≤ ·
    gram = gram_lower(small)  # its lower triangle is all eigvalsh reads
    sigma = math.sqrt(max(float(torch.linalg.eigvalsh(gram, UPLO="L")[-1]), 0.0))
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise ValueError(
            f"cannot normalise ΔW of {name!r}: its top singular value is {sigma} (zero gradient?)"
        )
    return sigma


def _check_matrix(name: str, M: object) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(M.shape)}")
