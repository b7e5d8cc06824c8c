"""From the finalized K-FAC statistics of one layer to its LoRA-DA factors (Algorithm 1, steps 2–5).

Pure functions, no hooks and no process groups: the pipeline (:mod:`lora_da_ref.torch.init`),
:mod:`lora_da_ref.validate` and the benchmarks all import this one map. Paper orientation,
``W`` (d_in, d_out) = (d1, d2); ``J ≈ Y ⊗ Z`` (:mod:`lora_da_ref.torch.fisher`).

Per layer:

1. ``J ≈ (Y + λI) ⊗ (Z + λI)`` (:class:`KroneckerFisher`; a diagonal ``Y`` uses ``1/(y_i + λ)``);
2. the Fisher–gradient ``ΔW = −Z⁻¹GY⁻¹`` (Eq. 21);
3. optionally (``normalize_delta``, official code) ``ΔW ← ΔW/σ`` with σ the top singular value of
   ΔW, and ``β ← β/σ²``: Ω is divided by σ², its eigenvectors are unchanged;
4. ``Ω = β tr(Y⁻¹)/N · Z⁻¹ − α ΔWΔWᵀ`` (Eq. 19); ``A0`` = its r smallest eigenvectors (Eqs. 5–8);
5. ``B0 = A0ᵀΔW`` (Eq. 17, with the normalised ΔW when normalising); with ``scale_gamma`` both
   factors are divided by ``√γ``.

:func:`lora_da_init` is the same map from ``(J, G, n, r)`` with the NumPy reference's signature
(:func:`lora_da_ref.initializers.lora_da_init`); :func:`solve_layer` keeps every intermediate
(:class:`LayerSolution`) for validation; :func:`layer_factors` returns what the pipeline stores.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_da_ref.torch.config import LoraDAConfig, LoraFactors
from lora_da_ref.torch.fisher import CholeskyFactor, FisherMatrix, KroneckerFisher, damped_cholesky
from lora_da_ref.torch.guidance import fisher_gradient, guidance_matrix
from lora_da_ref.torch.solvers import EigenResult, smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACStatistics

__all__ = [
    "Guidance",
    "LayerSolution",
    "kfac_fisher",
    "layer_factors",
    "layer_guidance",
    "layer_seed",
    "lora_da_init",
    "solve_layer",
    "top_singular_value",
]


@dataclass
class Guidance:
    """ΔW (d1, d2) (divided by σ when normalising), Ω (d1, d1) and σ (1.0 when not normalising)."""

    delta_w: Tensor
    omega: Tensor
    sigma: float


@dataclass
class LayerSolution:
    """Every intermediate of one layer's solve (what :mod:`lora_da_ref.validate` compares).

    Attributes:
        J: the K-FAC Fisher (damping applied in ``J.damping``).
        guidance: ΔW, Ω, σ (:class:`Guidance`).
        eig: the r smallest eigenpairs of Ω and the solver's diagnostics.
        A: (d1, r) ``A0 / √γ``.  B: (r, d2) ``A0ᵀΔW / √γ``.
        diagnostics: what :class:`LoraFactors` records (group, damping, σ, counts, solver).
    """

    J: FisherMatrix
    guidance: Guidance
    eig: EigenResult
    A: Tensor
    B: Tensor
    diagnostics: dict[str, Any]

    @property
    def delta_w(self) -> Tensor:
        return self.guidance.delta_w

    @property
    def omega(self) -> Tensor:
        return self.guidance.omega

    def factors(self) -> LoraFactors:
        """The stored result: float32 on CPU."""
        return LoraFactors(_out(self.A), _out(self.B), _out(self.eig.eigenvalues), self.diagnostics)


def kfac_fisher(
    stats: KFACStatistics,
    name: str,
    config: LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> KroneckerFisher:
    """``J ≈ (Y + λI) ⊗ (Z + λI)`` of layer ``name``; ``z_factors`` caches shared Z factors."""
    group = stats.group_of[name]
    z_factors = {} if z_factors is None else z_factors
    if group not in z_factors:
        z_factors[group] = damped_cholesky(stats.Z[group], config.damping, name=f"Z of {group}")
    return KroneckerFisher(stats.Y[name], z_factors[group], damping=config.damping)


def layer_guidance(J: FisherMatrix, G: Tensor, config: LoraDAConfig, name: str = "W") -> Guidance:
    """Eqs. (21) and (19) with the config's β, α, N and σ-normalisation, for any Fisher ``J``
    (K-FAC or dense), G (d1, d2)."""
    delta_w = fisher_gradient(J, G)  # (d1, d2)
    sigma = top_singular_value(delta_w, name) if config.normalize_delta else 1.0
    delta_w = delta_w / sigma
    omega = guidance_matrix(
        J, delta_w, config.n_train,
        variance_weight=config.variance_weight / sigma**2, bias_weight=config.bias_weight,
    )  # fmt: skip  # (d1, d1)
    return Guidance(delta_w, omega, sigma)


def solve_layer(
    stats: KFACStatistics,
    name: str,
    config: LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> LayerSolution:
    """Steps 2–5 of Algorithm 1 for one layer, keeping every intermediate."""
    J = kfac_fisher(stats, name, config, z_factors)
    guide = layer_guidance(J, stats.G[name], config, name)
    options = {"seed": layer_seed(config.seed, name), **config.solver_options}
    eig = smallest_eigenpairs(guide.omega, config.rank, solver=config.solver, **options)
    A, B = eig.vectors, eig.vectors.mT @ guide.delta_w  # (d1, r), (r, d2)
    scale = 1.0 if config.scale_gamma is None else math.sqrt(config.scale_gamma)
    diagnostics = _diagnostics(stats, name, J, guide.sigma, eig.diagnostics)
    return LayerSolution(J, guide, eig, A / scale, B / scale, diagnostics)


def layer_factors(
    stats: KFACStatistics,
    name: str,
    config: LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> LoraFactors:
    """Steps 2–5 of Algorithm 1 for one layer → :class:`LoraFactors` (float32, CPU)."""
    return solve_layer(stats, name, config, z_factors).factors()


def lora_da_init(
    J: FisherMatrix | Tensor,
    G: Tensor,
    n: int,
    r: int,
    *,
    delta_w: Tensor | None = None,
    variance_weight: float = 1.0,
    bias_weight: float = 1.0,
    solver: str = "eigh",
    **solver_options: Any,
) -> tuple[Tensor, Tensor]:
    """LoRA-DA initialisation, Theorem 4.1 / 4.2 and Eq. (17); the torch twin of
    :func:`lora_da_ref.initializers.lora_da_init` (same arguments, same return).

    ``ΔW = −J⁻¹G`` (Eq. 21) unless ``delta_w`` is given; Ω from Eq. (19); ``A0`` = the r smallest
    eigenvectors of Ω (Eqs. 5–8); ``B0 = A0ᵀΔW`` (Eq. 17).

    Args:
        J: Fisher of vec(W) at W0 (dense (d1·d2, d1·d2) tensor or a FisherMatrix).
        G: mean target-loss gradient at W0, (d1, d2). n: N. r: LoRA rank, 1 ≤ r ≤ d1.
        variance_weight, bias_weight: β, α of Eq. (19). solver, solver_options: see
            :func:`lora_da_ref.torch.solvers.smallest_eigenpairs`.

    Returns:
        (A0 (d1, r), B0 (r, d2)).
    """
    delta = fisher_gradient(J, G) if delta_w is None else delta_w  # (d1, d2)
    omega = guidance_matrix(J, delta, n, variance_weight=variance_weight, bias_weight=bias_weight)
    A0 = smallest_eigenpairs(omega, r, solver=solver, **solver_options).vectors  # (d1, r)
    return A0, A0.mT @ delta  # (r, d2)


def top_singular_value(delta_w: Tensor, name: str = "W") -> float:
    """σ_max(ΔW) as √λ_max of the smaller Gram matrix: 2–6× faster than a full SVD here, and as
    accurate for the top singular value (λ_max of MᵀM has relative error O(eps))."""
    gram = delta_w.mT @ delta_w if delta_w.shape[0] >= delta_w.shape[1] else delta_w @ delta_w.mT
    sigma = math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise ValueError(
            f"cannot normalise ΔW of {name!r}: its top singular value is {sigma} (zero gradient?)"
        )
    return sigma


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, stable across processes (no Python hash randomisation)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _diagnostics(
    stats: KFACStatistics, name: str, J: KroneckerFisher, sigma: float, solver: dict[str, Any]
) -> dict[str, Any]:
    return {
        "group": stats.group_of[name],
        "damping": J.damping,
        "delta_sigma": sigma,
        "tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens,
        "sequences": stats.sequences,
        **solver,
    }


def _out(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
