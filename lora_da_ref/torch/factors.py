"""From the finalized K-FAC statistics of one layer to its LoRA-DA factors (Algorithm 1, steps 2–5).

Pure functions, no hooks and no process groups: the pipeline (:mod:`lora_da_ref.torch.init`),
:mod:`lora_da_ref.cli.validate` and the benchmarks all import this one map. Paper orientation,
``W`` (d_in, d_out) = (d1, d2); ``J ≈ Y ⊗ Z`` (:mod:`lora_da_ref.torch.fisher`).

Per layer:

1. ``J ≈ (Y + λ_Y I) ⊗ (Z + λ_Z I)`` (:class:`KroneckerFisher`; a diagonal ``Y`` uses
   ``1/(y_i + λ_Y)``), damping relative to each factor's scale, ``λ_Z = δ·tr(Z)/d1``, or absolute
   (``config.damping_scale``);
2. the Fisher–gradient ``ΔW = −Z⁻¹GY⁻¹`` (Eq. 21);
3. optionally (``normalize_delta``, official code) ``ΔW ← ΔW/σ`` with σ the top singular value of
   ΔW, and ``β ← β/σ²``: Ω is divided by σ², its eigenvectors are unchanged;
4. ``Ω = β tr(Y⁻¹)/N · Z⁻¹ − α ΔWΔWᵀ`` (Eq. 19); ``A0`` = its r smallest eigenvectors (Eqs. 5–8);
5. ``B0 = A0ᵀΔW`` (Eq. 17, with the normalised ΔW when normalising); with ``scale_gamma`` both
   factors are divided by ``√γ``.

**Precision.** The statistics may be accumulated in float32, but everything here runs in float64
(:data:`SOLVE_DTYPE`): Cholesky, the triangular solves of ΔW, the block sum, Ω and its eigen-solve.
Each layer records the damping applied, ``κ₁`` of the damped factors, the eigengap and
``precision_bound``, a first-order bound on how far rounding the statistics to their dtype moves
A0 (radians; :func:`precision_bound`, no extra solve). A layer whose bound exceeds
:data:`TRUST_RAD` is re-solved once from statistics perturbed at their rounding
(:func:`precision_probe`); the ``"full"`` diagnostics re-solve every layer, at the rounding the
pass measured. :func:`lora_da_ref.precision.layer_precision` turns the two into the verdict
(a probe's one draw clears a layer only with a margin below :data:`TRUST_RAD`), and
:func:`untrusted_layers` lists the layers it does not clear.

:func:`lora_da_init` is the same map from ``(J, G, n, r)`` for one layer, with the NumPy
reference's name and signature (:func:`lora_da_ref.reference.initializers.lora_da_init`; the whole
model is :func:`lora_da_ref.torch.init.init_lora_da`); :func:`solve_layer` keeps every intermediate
(:class:`LayerSolution`), and ``solve_layer(...).factors()`` is what the pipeline stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from lora_da_ref.precision import TRUST_RAD, layer_precision
from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    SolveConfig,
    rank_of,
    solve_config_of,
)
from lora_da_ref.torch.diagnostics import (
    calibration_diagnostics,
    plug_in_sample_size,
    principal_angles,
)
from lora_da_ref.torch.fisher import (
    CholeskyFactor,
    FisherMatrix,
    KroneckerFisher,
    damped_cholesky,
    relative_damping,
)
from lora_da_ref.torch.guidance import Guidance, fisher_gradient, guidance_matrix, layer_guidance
from lora_da_ref.torch.solvers import EigenResult, layer_seed, smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACStatistics

__all__ = [
    "SOLVE_DTYPE",
    "TRUST_RAD",
    "UNSCALED_B0_KEY",
    "LayerSolution",
    "diagnose_layer",
    "kfac_fisher",
    "lora_da_init",
    "precision_bound",
    "precision_probe",
    "requested_damping",
    "rounding_floor",
    "rounding_measured",
    "solve_layer",
    "untrusted_layers",
]

T = TypeVar("T")
SOLVE_DTYPE = torch.float64  # every solve, whatever the statistics dtype
# Diagnostics key: True when B0 = A0ᵀΔŴ is neither σ-normalised nor γ-scaled (apply_lora_da warns).
UNSCALED_B0_KEY = "unscaled_B0"


@dataclass
class LayerSolution:
    """Every intermediate of one layer's solve (what :mod:`lora_da_ref.cli.validate` compares).

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
    config: SolveConfig | LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> KroneckerFisher:
    """``J ≈ (Y + λ_Y I) ⊗ (Z + λ_Z I)`` of layer ``name`` in float64; ``z_factors`` caches the
    factors of a shared Z. Raises ``ValueError`` naming the layer when a damped factor is not PD
    (after the one documented step of :func:`damping_of`)."""
    group = stats.group_of[name]
    z_factors = {} if z_factors is None else z_factors
    try:
        if group not in z_factors:
            Z = stats.Z[group].to(SOLVE_DTYPE)  # (d1, d1)
            z_factors[group] = damping_of(
                Z,
                config,
                lambda lam: damped_cholesky(Z, lam, name=f"Z of {group!r}"),
                products_dtype(stats),
            )
        Y = stats.Y[name].to(SOLVE_DTYPE)  # (d2, d2) or (d2,)
        return damping_of(
            Y,
            config,
            lambda lam: KroneckerFisher(Y, z_factors[group], y_damping=lam),
            products_dtype(stats),
        )
    except ValueError as err:
        raise ValueError(
            f"layer {name!r}: {err} (LoraDAConfig damping={config.damping:g}, "
            f"damping_scale={config.damping_scale!r})"
        ) from None


def products_dtype(stats: KFACStatistics) -> torch.dtype:
    """The dtype the statistics' per-batch products were rounded to (their sums are float64)."""
    return getattr(torch, stats.dtype)


def damping_of(
    M: Tensor, config: SolveConfig | LoraDAConfig, factorise: Callable[[float], T],
    dtype: torch.dtype,
) -> T:  # fmt: skip
    """``factorise(λ)`` with the requested damping (:func:`requested_damping`); when ``M + λI``
    is not positive definite and ``λ`` is below :func:`rounding_floor` of the products'
    ``dtype``, once more at the floor (recorded in ``diagnostics["damping_raised"]``, warned
    about by the pipeline). Otherwise the ``ValueError`` stands: no tenfold loop, no silent
    re-damping."""
    requested = requested_damping(M, config)
    try:
        return factorise(requested)
    except ValueError:
        floor = rounding_floor(M, dtype)
        if not requested < floor:
            raise
        return factorise(floor)


def requested_damping(M: Tensor, config: SolveConfig | LoraDAConfig) -> float:
    """``δ·tr(M)/d`` (``damping_scale="relative"``) or ``δ`` (``"absolute"``)."""
    if config.damping_scale == "relative":
        return relative_damping(M, config.damping)
    return float(config.damping)


def rounding_floor(M: Tensor, dtype: torch.dtype) -> float:
    """``u·tr(M)`` (``u`` the unit roundoff of ``dtype``): the size of the rounding error of a sum
    of PSD products ``x xᵀ`` computed in ``dtype`` (‖δM‖₂ ≲ u·Σ‖x‖² = u·tr M). A damping below it
    is below the noise of the statistics, where ``M + λI`` need not be positive definite."""
    trace = float(M.sum()) if M.ndim == 1 else float(M.diagonal().sum())
    return torch.finfo(dtype).eps / 2 * max(trace, 0.0)


def solve_layer(
    stats: KFACStatistics,
    name: str,
    config: SolveConfig | LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
    *,
    probe: bool = True,
    rank: int | None = None,
) -> LayerSolution:
    """Steps 2–5 of Algorithm 1 for one layer, keeping every intermediate, then
    :func:`diagnose_layer` at ``config.diagnostics``'s tier. ``rank``: this layer's r (a PEFT
    ``rank_pattern``; a :class:`LoraDAConfig`'s ``rank`` when ``None``); the statistics do not
    depend on it."""
    rank = rank_of(config, rank)
    config = solve_config_of(config)
    J = kfac_fisher(stats, name, config, z_factors)
    size = plug_in_sample_size(stats) if config.estimator != "plugin" else None
    guide = layer_guidance(J, stats.G[name].to(SOLVE_DTYPE), config, name, size)
    options = {"seed": layer_seed(config.seed, name), **config.solver_options}
    eig = smallest_eigenpairs(guide.omega, rank, solver=config.solver, **options)
    A, B = eig.vectors, eig.vectors.mT @ guide.delta_w  # (d1, r), (r, d2)
    scale = 1.0 if config.scale_gamma is None else math.sqrt(config.scale_gamma)
    diagnostics = _diagnostics(stats, name, config, J, guide.sigma, eig.diagnostics)
    solution = LayerSolution(J, guide, eig, A / scale, B / scale, diagnostics)
    diagnose_layer(stats, name, config, solution, rank, z_factors, probe=probe)
    return solution


def diagnose_layer(
    stats: KFACStatistics,
    name: str,
    config: SolveConfig,
    solution: LayerSolution,
    rank: int,
    z_factors: dict[str, CholeskyFactor] | None = None,
    *,
    probe: bool = True,
) -> None:
    """The diagnostics of ``config.diagnostics``'s tier, added to ``solution.diagnostics`` from
    the solve's own intermediates (no second Fisher solve): ``"off"`` none; ``"cheap"`` the
    calibration SNR (plug-in and split-half noise), :func:`precision_bound` and, when ``probe``
    and the bound exceeds :data:`TRUST_RAD`, :func:`precision_probe` (one re-solve of the
    layers the bound cannot clear, read with a margin by
    :func:`lora_da_ref.precision.layer_precision`); ``"full"`` also the split-half solves and,
    when ``probe``, :func:`precision_probe` on every layer. ``precision_rounding`` says whether the probe
    perturbed at the rounding the pass measured (``"measured"``, the full tier) or at the
    rounding model's own size (``"model"``)."""
    if config.diagnostics == "off":
        return
    J, guide, eig, diagnostics = solution.J, solution.guidance, solution.eig, solution.diagnostics
    delta = guide.delta_w * guide.sigma  # unnormalised ΔŴ (σ = 1 unless normalising)
    full = config.diagnostics == "full"
    diagnostics |= calibration_diagnostics(
        stats, name, config, J, delta, split_solves=full, rank=rank
    )
    bound = precision_bound(stats, name, config, J, guide, eig)
    diagnostics["precision_bound"] = bound
    if probe and (full or (bound is not None and bound > TRUST_RAD)):
        diagnostics["precision_probe"] = precision_probe(
            stats, name, config, solution, z_factors, rank=rank
        )
        diagnostics["precision_rounding"] = (
            "measured" if rounding_measured(stats, name) else "model"
        )


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
    """LoRA-DA initialisation of ONE layer, Theorem 4.1 / 4.2 and Eq. (17); the torch twin of
    :func:`lora_da_ref.reference.initializers.lora_da_init` (same name, arguments and return, so
    one test compares both on one problem). The whole model (statistics, then this map per layer)
    is :func:`lora_da_ref.torch.init.init_lora_da`.

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


def precision_probe(
    stats: KFACStatistics,
    name: str,
    config: SolveConfig,
    solution: LayerSolution,
    z_factors: dict[str, CholeskyFactor] | None = None,
    *,
    rank: int,
) -> float | None:
    """How far rounding the statistics to their dtype can move A0 (radians; ``None`` for float64
    statistics): the largest principal angle between A0 and the A0 solved (in float64, same
    solver and seed) from statistics perturbed at that dtype's rounding level.

    The perturbation models the rounding of the sums: ``δZ_ij = c_Z·u·√(Z_ii Z_jj)·ε_ij`` (ε
    symmetric standard normal, ``u`` the unit roundoff of the statistics dtype), likewise for
    ``Y`` (``δy_i = c_Y·u·y_i·ε_i`` for a diagonal Y), and ``δG_ij = c_G·u·√(ρ_i κ_j)·ε_ij`` with
    ρ, κ the root-mean-square of G's rows and columns; ``c`` scales each to the rounding the pass
    measured (:func:`rounding_scales`). One seeded draw: an estimate of the error's size, not a
    bound (it is compared with the measured float32-vs-float64 angles in docs/numerics.md).

    Layers that share a Z (q/k/v, gate/up) share its perturbation (drawn from the group's seed)
    and, through ``z_factors`` (the pipeline's cache), the perturbed Z's Cholesky factor.
    """
    group = stats.group_of[name]
    dtype = products_dtype(stats)  # the per-batch products were rounded to it
    if dtype == SOLVE_DTYPE:
        return None
    u = torch.finfo(dtype).eps / 2
    c_z, c_y, c_g = rounding_scales(stats, name, u)
    z_factors = {} if z_factors is None else z_factors
    probe_group = f"{group} (precision probe)"  # its own key in the Cholesky cache
    Z = stats.Z[group].to(SOLVE_DTYPE)
    if probe_group not in z_factors:
        z_gen = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, group) ^ 0x5EED)
        # else unused: the cached factor of the perturbed Z
        Z = _perturb_gram(Z, c_z * u, z_gen, rounded_diagonal(stats, group))
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, name) ^ 0x5EED)
    Y, G = stats.Y[name].to(SOLVE_DTYPE), stats.G[name].to(SOLVE_DTYPE)
    perturbed = KFACStatistics(
        {probe_group: Z}, {name: _perturb_gram(Y, c_y * u, gen)},
        {name: G + c_g * u * _scale_of(G) * _noise(G.shape, gen, G)}, {name: probe_group},
        stats.tokens, stats.loss_tokens, stats.sequences, stats.batches,
        gradient_weight=stats.gradient_weight, dtype=stats.dtype,  # |S| of the debiased estimator
    )  # fmt: skip
    # The perturbed solve needs only A0: no calibration diagnostics (they cost a block sum) and
    # no σ-normalisation (Ω/σ² has the same eigenvectors; σ costs a Gram eigen-solve).
    quiet = config.replace(diagnostics="off", normalize_delta=False)
    other = solve_layer(perturbed, name, quiet, z_factors, probe=False, rank=rank)
    return _largest_angle(solution.eig.vectors, other.eig.vectors)


def precision_bound(
    stats: KFACStatistics,
    name: str,
    config: SolveConfig,
    J: KroneckerFisher,
    guide: Guidance,
    eig: EigenResult,
) -> float | None:
    """A first-order bound on how far rounding the statistics to their dtype moves A0 (radians;
    ``None`` for float64 statistics, and for a solver that reports no eigengap, i.e. LOBPCG,
    whose own residual is checked instead), from quantities the solve holds: no extra solve.

    **Model** (:func:`precision_probe`'s): ``δZ = c_Z·u·D E D`` (``D = diag(√Z_ii)`` over the
    rows the pass rounded, :func:`rounded_diagonal`; E symmetric with unit entries), ``δy_i = c_Y·u·y_i·ε_i`` for a diagonal Y (``c_Y·u·D_Y E D_Y``
    for a full one), ``δG_ij = c_G·u·√(ρ_i κ_j)·ε_ij`` (ρ, κ the root-mean-square of G's rows and
    columns), ``u`` the unit roundoff of the statistics dtype. Each ``c`` is the rounding the
    pass measured in that statistic (Frobenius norm) over the model's root-mean-square size
    (:func:`rounding_scales`; 1 for statistics without the measurement): the model keeps its
    shape and takes the measured size.

    **First order.** With ``Ω = c·Q − αΔΔᵀ`` (``Q = (Z + λI)⁻¹``, ``c`` the variance coefficient
    times ``tr((Y + λ)⁻¹)``, Δ the ΔW of the solve, ``Ω a_k = λ_k a_k``) and
    ``δΔ = −Q δZ Δ − Δ δY (Y + λ)⁻¹ − Q δG (Y + λ)⁻¹/σ``, the part of ``δΩ a_k`` from Z is

        −Q δZ (c·Q a_k − αΔΔᵀa_k) + αΔΔᵀ δZ Q a_k = −λ_k·Q δZ a_k + αΔΔᵀ δZ Q a_k,

    (the variance and bias terms largely cancel: ``cQa_k − αΔΔᵀa_k = λ_k a_k``), and likewise for
    Y (through ``c`` and ``2αΔ δY (Y + λ)⁻¹ Δᵀa_k`` for a diagonal Y) and G. For each,
    ``E‖P⊥ M E n‖² ≤ ‖P⊥M‖²_F ‖n‖²`` (``P⊥ = I − A0A0ᵀ``: only the part leaving span(A0) turns
    it); terms that share a draw are added, the independent sources in quadrature. A column
    ``a_k`` turns towards eigenvectors whose eigenvalues lie at least ``λ_{r+1} − λ_k`` away, so
    to first order ``‖tan Θ‖_F² ≤ Σ_k ‖P⊥ δΩ a_k‖² / (λ_{r+1} − λ_k)²`` and the largest
    principal angle is at most ``atan`` of that. Cost: ``O(d1²·r + d1·d2·r)`` with ``Q`` cached by
    the Cholesky factor, against the ``O(d1³)`` of the solve.

    A bound on the model's root-mean-square, not a worst case: compared with the measured
    float32-vs-float64 angles in docs/numerics.md ("Precision bound").
    """
    dtype = products_dtype(stats)
    if dtype == SOLVE_DTYPE or "gap" not in eig.diagnostics:  # LOBPCG reports no λ_{r+1}
        return None
    gap = float(eig.diagnostics["gap"])
    if not gap > 0:  # a repeated eigenvalue at r: the subspace is not determined at all
        return math.pi / 2
    u = torch.finfo(dtype).eps / 2
    V = eig.vectors.to(SOLVE_DTYPE)  # (d1, r)
    lam = eig.eigenvalues.to(SOLVE_DTYPE)  # (r,) ascending
    gaps = lam[-1] + gap - lam  # λ_{r+1} − λ_k, (r,)
    delta = guide.delta_w  # (d1, d2), as in Ω
    X = delta.mT @ V  # Δᵀ a_k, (d2, r)
    Q = J.z_inverse()  # (d1, d1), cached
    QV = Q @ V  # (d1, r)
    c = guide.variance_coefficient * float(J.y_inverse_trace())
    alpha = abs(guide.bias_weight)
    norm_delta = 1.0 if config.normalize_delta else float(torch.linalg.matrix_norm(delta, 2))

    def perp(M: Tensor) -> float:  # ‖P⊥ M‖_F = √(‖M‖²_F − ‖A0ᵀM‖²_F)
        return math.sqrt(max(_fro(M) ** 2 - _fro(V.mT @ M) ** 2, 0.0))

    def cols(M: Tensor) -> Tensor:  # column norms, (r,)
        return torch.linalg.vector_norm(M, dim=0)

    dz = rounded_diagonal(stats, stats.group_of[name]).sqrt()  # √Z_ii of the rounded rows
    e_z = perp(Q * dz[None, :]) * lam.abs() * cols(dz[:, None] * V) + alpha * norm_delta * _fro(
        dz[:, None] * delta
    ) * cols(dz[:, None] * QV)
    Y = stats.Y[name].to(SOLVE_DTYPE)
    QV_perp = cols(QV - V @ (V.mT @ QV))  # ‖P⊥ Q a_k‖
    if Y.ndim == 1:
        inv = (Y + J.damping["Y"]).reciprocal()
        dc = c * _fro(Y.abs() * inv * inv) / float(inv.sum())  # RMS of δc from δy
        e_y = dc * QV_perp + 2 * alpha * norm_delta * cols(X * (Y.abs() * inv)[:, None])
        YinvX = X * inv[:, None]
        y_kappa = lambda k: _fro(inv * k)  # noqa: E731  ‖(Y + λ)⁻¹ diag(k)‖_F
    else:
        Yinv = J.y_inverse()
        dy = Y.diagonal().clamp_min(0).sqrt()
        dc = c * _fro(Yinv * dy[None, :]) ** 2 / float(Yinv.trace())  # ‖DY⁻²D‖_F ≤ ‖Y⁻¹D‖²_F
        YinvX = Yinv @ X
        e_y = dc * QV_perp + alpha * (
            _fro(delta * dy[None, :]) * cols(dy[:, None] * YinvX)
            + norm_delta * _fro(Yinv * dy[None, :]) * cols(dy[:, None] * X)
        )
        y_kappa = lambda k: _fro(Yinv * k[None, :])  # noqa: E731
    G = stats.G[name].to(SOLVE_DTYPE)
    rho = G.square().mean(dim=1).sqrt().sqrt()  # √ρ_i
    kappa = G.square().mean(dim=0).sqrt().sqrt()  # √κ_j
    e_g = (alpha / guide.sigma) * (
        perp(Q * rho[None, :]) * cols(kappa[:, None] * YinvX)
        + norm_delta * y_kappa(kappa) * cols(rho[:, None] * QV)
    )
    c_z, c_y, c_g = rounding_scales(stats, name, u)
    turn = u * torch.sqrt((c_z * e_z).square() + (c_y * e_y).square() + (c_g * e_g).square())
    return float(torch.atan(torch.linalg.vector_norm(turn / gaps)))


def rounding_scales(stats: KFACStatistics, name: str, u: float) -> tuple[float, float, float]:
    """``(c_Z, c_Y, c_G)`` of layer ``name``: the Frobenius norm of the rounding the pass measured
    in each statistic (``stats.rounding``) over the rounding model's root-mean-square size —
    ``u·Σ_i Z_ii`` (the rounded rows', :func:`rounded_diagonal`) for ``δZ = u·D E D``, ``u·‖y‖`` for a diagonal Y, ``u·‖√(ρ_i κ_j)‖_F`` for G —
    so that :func:`precision_bound` and :func:`precision_probe` perturb at the measured size.
    1 for a statistic without the measurement (float64 statistics, a pass below the ``"full"``
    diagnostics tier, or statistics saved before the pass measured it): the model's own size."""

    def scale(key: str, model_norm: float) -> float:
        measured = stats.rounding.get(key)
        if measured is None or not model_norm > 0:
            return 1.0
        return measured / model_norm

    group = stats.group_of[name]
    Y, G = stats.Y[name].to(SOLVE_DTYPE), stats.G[name].to(SOLVE_DTYPE)
    y_model = Y.norm() if Y.ndim == 1 else Y.diagonal().abs().sum()
    return (
        scale(f"Z/{group}", u * float(rounded_diagonal(stats, group).sum())),
        scale(f"Y/{name}", u * float(y_model)),
        scale(f"G/{name}", u * _fro(_scale_of(G))),
    )


def _fro(M: Tensor) -> float:
    return float(torch.linalg.vector_norm(M))


def _noise(shape: tuple[int, ...], gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=SOLVE_DTYPE).to(like.device)


def rounded_diagonal(stats: KFACStatistics, group: str) -> Tensor:
    """The part of ``diag Z`` (d_in,) of input group ``group`` that the pass rounded: the whole
    diagonal, less the rows it took in float64 (``KFACStatistics.heavy_diag``, a massive
    activation's rows), in :data:`SOLVE_DTYPE`. The rounding models of :func:`precision_bound`,
    :func:`precision_probe` and :func:`rounding_scales` scale with it: a row summed in float64
    adds no rounding."""
    diag = stats.Z[group].diagonal().to(SOLVE_DTYPE)
    heavy = stats.heavy_diag.get(group)
    if heavy is not None:
        diag = diag - heavy.to(device=diag.device, dtype=SOLVE_DTYPE)
    return diag.clamp_min(0)


def _perturb_gram(M: Tensor, u: float, gen: torch.Generator, diag: Tensor | None = None) -> Tensor:
    """``M + u·√(d_i d_j)·ε`` (ε symmetric, ``d = diag`` or ``diag M``); a vector ``M`` is a
    diagonal: ``M + u·M·ε``."""
    if M.ndim == 1:
        return M + u * M.abs() * _noise(M.shape, gen, M)
    E = _noise(M.shape, gen, M)
    root = (M.diagonal() if diag is None else diag).abs().sqrt()  # (d,)
    return M + u * (root[:, None] * root[None, :]) * (E + E.mT) / math.sqrt(2.0)


def _scale_of(G: Tensor) -> Tensor:
    """``√(ρ_i κ_j)`` (d1, d2), ρ and κ the root-mean-square of G's rows and columns."""
    rows = G.square().mean(dim=1).sqrt()  # (d1,)
    cols = G.square().mean(dim=0).sqrt()  # (d2,)
    return (rows[:, None] * cols[None, :]).sqrt()


def _largest_angle(A: Tensor, B: Tensor) -> float:
    return float(principal_angles(A, B).max())


def untrusted_layers(factors: dict[str, LoraFactors]) -> dict[str, float]:
    """``{layer: angle}`` for the layers the precision check does not clear
    (:func:`lora_da_ref.precision.layer_precision`: failed or unverified), with the number that
    decided: the :func:`precision_probe`'s re-solve where it ran (every layer the bound did not
    clear), else the :func:`precision_bound` (every diagnostics tier but ``"off"``)."""
    checked = {name: layer_precision(f.diagnostics) for name, f in factors.items()}
    return {name: p.angle for name, p in checked.items() if p.verdict is not None}


def rounding_measured(stats: KFACStatistics, name: str) -> bool:
    """Whether the pass measured the rounding of layer ``name``'s statistics (the full tier's
    sketches, ``KFACStatistics.rounding``): :func:`rounding_scales` then scales to it."""
    group = stats.group_of[name]
    return any(k in stats.rounding for k in (f"Z/{group}", f"Y/{name}", f"G/{name}"))


def _diagnostics(
    stats: KFACStatistics, name: str, config: SolveConfig, J: KroneckerFisher, sigma: float,
    solver: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "group": stats.group_of[name],
        "damping": J.damping,
        "damping_raised": _raised(stats, name, config, J),
        "cond": J.conditioning(),
        "statistics_dtype": stats.dtype,
        "delta_sigma": sigma,
        UNSCALED_B0_KEY: not config.scales_b0,
        "tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens,
        "sequences": stats.sequences,
        **solver,
    }


def _raised(
    stats: KFACStatistics, name: str, config: SolveConfig, J: KroneckerFisher
) -> dict[str, float]:
    """The factors whose damping the rounding floor raised: ``{factor: requested λ}``."""
    requested = {
        "Z": requested_damping(stats.Z[stats.group_of[name]], config),
        "Y": requested_damping(stats.Y[name], config),
    }
    return {k: v for k, v in requested.items() if J.damping[k] > v}


def _out(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
