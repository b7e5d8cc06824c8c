"""The production path against the exact theory on every layer of a case (``validate``).

For each chosen layer ``W`` (d1, d2) = (d_in, d_out) of a small model and a calibration set, this
compares, against **exact** ground truths built from the dense per-token empirical Fisher ``J``
(:mod:`lora_da_ref.torch.exact`):

* the Fisher–gradient ``ΔW = −J⁻¹G`` (Eq. 21), the guidance matrix
  ``Ω = β/N Σ_i J⁻¹_[i] − α ΔWΔWᵀ`` (Eq. 19) and its ``A0`` = r smallest eigenvectors (Eqs. 5–8);
* with the production path's versions: K-FAC with a full ``Y`` (``kfac-full``, the paper's
  Algorithm 1), with a diagonal ``Y`` (``kfac-diag``), and the ``official`` preset (diagonal Y,
  σ-normalised ΔW, β = 0.03, batch-scaled scores, 10 LOBPCG iterations), each as returned by
  ``solve_layer(...).factors()`` (:func:`lora_da_ref.torch.factors.solve_layer`);
* and, on the same Ω, ``eigh`` vs LOBPCG with the official 10 iterations vs LOBPCG run to tolerance.

Each method is compared with the exact counterpart **with its own settings** (β, α, N, the
σ-normalisation, the score scale and the G weighting), through the one statistics→factors map
:func:`lora_da_ref.torch.guidance.layer_guidance` applied to the dense exact ``J`` and to K-FAC, so
the numbers measure the approximation (K-FAC, diagonal Y, token mask, solver), not the choice of
hyper-parameters.

Metrics per layer and method (:mod:`.metrics`): ``‖ΔW−ΔW*‖/‖ΔW*‖``, ``‖Ω−Ω*‖_F/‖Ω*‖_F``, the
largest principal angle between ``A0`` and ``A0*`` (radians), the regret
``tr(A0ᵀΩ*A0) − (λ1*+…+λr*)`` ≥ 0 (Eq. 8), also divided by ``r‖Ω*‖₂``, and
``max_i |λ_i − λ_i*| / ‖Ω*‖₂`` over the r smallest eigenvalues.

On CPU both paths run in float64 (the exact path on a copy without HF's float32 casts); with
``device="cuda"`` the production path runs on a bfloat16 copy with float32 statistics, the exact
path in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.exact import (
    ExactFisherStatistics,
    TokenLossFn,
    exact_fisher_variants,
    full_precision_copy,
)
from lora_da_ref.torch.factors import kfac_fisher, solve_layer
from lora_da_ref.torch.fisher import DenseFisher
from lora_da_ref.torch.guidance import Guidance, layer_guidance
from lora_da_ref.torch.solvers import EigenResult, layer_seed, smallest_eigenpairs
from lora_da_ref.torch.stages import collect_statistics
from lora_da_ref.torch.statistics import KFACStatistics
from lora_da_ref.torch.validation.cases import Batch, ValidationCase
from lora_da_ref.torch.validation.metrics import (
    largest_angle,
    relative_error,
    solver_comparison,
    spectral_norm,
    subspace_metrics,
    to_numpy,
)

__all__ = ["DEFAULT_RANK", "MAX_PARAMS", "METHODS", "Method", "validate"]

MAX_PARAMS = 4096  # d1·d2 above this makes the dense J ((d1·d2)² entries) too big for a check
DEFAULT_RANK = 4  # built-in layers have d_in >= 12: r = 4 lets LOBPCG run (it needs d >= 3r)


@dataclass(frozen=True)
class Method:
    """A production configuration and how its exact counterpart is built."""

    config: Callable[..., LoraDAConfig]
    overrides: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "kfac-full": Method(LoraDAConfig.paper_literal, {"output_factor": "full"}),
    "kfac-diag": Method(LoraDAConfig.paper_literal, {"output_factor": "diagonal"}),
    "official": Method(LoraDAConfig.official),
}


@dataclass
class _Context:
    case: ValidationCase
    rank: int
    n_train: int | None
    device: torch.device
    exact_model: nn.Module
    production_model: nn.Module
    stats_dtype: torch.dtype

    def config(self, method: Method) -> LoraDAConfig:
        extra = {} if self.n_train is None else {"n_train": self.n_train}
        return method.config(
            rank=self.rank, dtype=self.stats_dtype, target_modules=tuple(self.case.layers),
            label_shift=self.case.label_shift, **method.overrides, **extra,
        )  # fmt: skip


def validate(
    case: ValidationCase,
    *,
    rank: int = DEFAULT_RANK,
    n_train: int | None = None,
    device: str = "cpu",
    methods: Sequence[str] = tuple(METHODS),
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the production path with the exact theory on every layer of ``case``.

    Args:
        case: the model (left exactly as it was), batches, layers and per-token loss.
        rank: r.
        n_train: N (default: LoraDAConfig's).
        device: ``"cpu"`` (both paths in float64) or ``"cuda"`` (production on a bfloat16 copy
            with float32 statistics; exact in float64).
        methods: keys of :data:`METHODS`.
        seed: the solver seed (per-layer seeds as in solve_layer).

    Returns:
        A JSON-able report: ``{"case", "rank", "n_train", "tokens", "device", "layers": {name:
        {"shape", "exact", "methods": {m: metrics}, "solvers": {...}}}, "seconds"}``.
    """
    start = time.perf_counter()
    ctx = _context(case, rank, n_train, device)
    _check_layers(case, rank, methods)
    exact_targets = _targets(ctx.exact_model, case.layers)
    prod_targets = _targets(ctx.production_model, case.layers)
    report: dict[str, Any] = {"case": case.id, "description": case.description, "rank": rank}
    report |= {"device": str(ctx.device), "stats_dtype": str(ctx.stats_dtype)[6:]}
    layers: dict[str, Any] = {name: {} for name in case.layers}
    configs = {m: ctx.config(METHODS[m]).replace(seed=seed) for m in methods}
    exact_all = exact_fisher_variants(
        ctx.exact_model, _on(case.batches, ctx.device), exact_targets,
        sorted({(c.score_scale, c.gradient_weight) for c in configs.values()}),
        token_losses=case.token_losses,
    )  # fmt: skip
    for method_name, config in configs.items():
        report["n_train"] = config.n_train
        exact = exact_all[config.score_scale, config.gradient_weight]
        stats = collect_statistics(
            ctx.production_model, _on(case.batches, ctx.device), prod_targets, config,
            loss_fn=_mean_loss(case.token_losses), progress=False,
        )  # fmt: skip
        report["tokens"] = exact.tokens
        first = method_name == next(iter(configs))
        for name in case.layers:
            layer = layers[name]
            layer.setdefault("shape", list(exact.shapes[name]))
            entry = _compare_layer(name, exact, stats, config, exact_solvers=first)
            layer.setdefault("exact", {})[method_name] = entry.pop("exact")
            solvers = layer.setdefault("solvers", {})
            for side, runs in entry.pop("solvers").items():
                if runs is not None:
                    solvers[f"{method_name} {side}"] = runs
            layer.setdefault("methods", {})[method_name] = entry
    report["layers"] = layers
    report["seconds"] = time.perf_counter() - start
    return report


def _context(case: ValidationCase, rank: int, n_train: int | None, device: str) -> _Context:
    if not isinstance(case, ValidationCase):
        raise TypeError(f"case must be a ValidationCase, got {type(case).__name__}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    exact_model = full_precision_copy(case.model).to(dev)
    if dev.type == "cuda":
        production = deepcopy(case.model).to(device=dev, dtype=torch.bfloat16).eval()
        stats_dtype = torch.float32
    else:
        production, stats_dtype = exact_model, torch.float64
    return _Context(case, rank, n_train, dev, exact_model, production, stats_dtype)


def _check_layers(case: ValidationCase, rank: int, methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    if not case.layers:
        raise ValueError("no layers to validate")
    modules = dict(case.model.named_modules())
    for name in case.layers:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"layer {name!r} is not an nn.Linear of the model")
        d1, d2 = m.in_features, m.out_features
        if d1 * d2 > MAX_PARAMS:
            raise ValueError(
                f"layer {name!r} has d_in·d_out = {d1 * d2} > {MAX_PARAMS}: its dense Fisher "
                f"would have {(d1 * d2) ** 2:.3g} entries; choose smaller layers (--layers)"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(d1, d2):
            raise ValueError(f"rank {rank!r} must be an integer in [1, {min(d1, d2)}] for {name!r}")


def _targets(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}


def _on(batches: list[Batch], device: torch.device) -> list[Batch]:
    return [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches
    ]


def _mean_loss(token_losses: TokenLossFn) -> Callable[[nn.Module, Batch], Tensor]:
    """The batch's mean token loss, in the model's dtype (HF's own loss casts logits to float32)."""
    return lambda model, batch: token_losses(model, batch).mean()


def _compare_layer(
    name: str,
    exact: ExactFisherStatistics,
    stats: KFACStatistics,
    config: LoraDAConfig,
    exact_solvers: bool,
) -> dict[str, Any]:
    """Exact vs production ΔW, Ω, A0 of one layer; the solver comparison on the production Ω
    (when it is solved by LOBPCG) and, if ``exact_solvers``, on the exact Ω."""
    d1, d2 = exact.shapes[name]
    r = config.rank
    J_exact = DenseFisher(exact.J[name], d1, d2, damping=0.0)
    ref = layer_guidance(J_exact, exact.G[name], config)
    ref_eig = smallest_eigenpairs(ref.omega, r, solver="eigh")
    to64 = dict(device="cpu", dtype=torch.float64)
    J_kfac = kfac_fisher(stats, name, config)  # float64, with the damping the production applies
    ours = layer_guidance(J_kfac, stats.G[name].to(**to64), config)
    factors = solve_layer(stats, name, config).factors()  # the production result
    gamma = 1.0 if config.scale_gamma is None else math.sqrt(config.scale_gamma)
    A0 = torch.linalg.qr(factors.A.to(torch.float64) * gamma)[0]  # (d1, r); float32 → exact AᵀA = I
    seed = layer_seed(config.seed, name)
    metrics = subspace_metrics(A0, factors.eigenvalues, ref.omega, r)
    metrics |= {
        "J_err": relative_error(J_kfac.to_dense(), J_exact.to_dense()),
        "G_err": relative_error(stats.G[name], exact.G[name]),
        "delta_w_err": relative_error(ours.delta_w, ref.delta_w),
        "omega_err": relative_error(ours.omega, ref.omega),
        "reproduced": _reproduction_angle(ours.omega, A0, config, seed),
        "solver": factors.diagnostics.get("solver"),
        "fallback": factors.diagnostics.get("fallback"),
    }
    metrics["exact"] = _exact_summary(exact, name, J_exact, ref, ref_eig)
    metrics["solvers"] = {
        "production": solver_comparison(ours.omega, r, seed) if config.solver == "lobpcg" else None,
        "exact": solver_comparison(ref.omega, r, seed) if exact_solvers else None,
    }
    return metrics


def _reproduction_angle(omega: Tensor, A0: Tensor, config: LoraDAConfig, seed: int) -> float:
    """Angle between the production A0 and our re-solve of our Ω with the production solver:
    ~0 (float32 output) iff our Ω is the matrix the production path solved."""
    eig = smallest_eigenpairs(
        omega.to(config.dtype), config.rank, solver=config.solver, seed=seed,
        **config.solver_options,
    )  # fmt: skip
    return largest_angle(eig.vectors, A0)


def _exact_summary(
    exact: ExactFisherStatistics, name: str, J: DenseFisher, ref: Guidance, eig: EigenResult
) -> dict[str, Any]:
    d1, d2 = exact.shapes[name]
    spectrum = np.linalg.eigvalsh(to_numpy(exact.J[name]))  # ascending
    variance = ref.omega + _scaled_bias(ref)
    return {
        "tokens": exact.tokens,
        "params": d1 * d2,
        "cond_J": float(spectrum[-1] / max(spectrum[0], np.finfo(float).tiny)),
        "damping_J": J.damping["J"],
        "var_over_bias": spectral_norm(variance) / max(spectral_norm(_scaled_bias(ref)), 1e-300),
        "eigenvalues": to_numpy(eig.eigenvalues).tolist(),
    }


def _scaled_bias(ref: Guidance) -> Tensor:
    return ref.delta_w @ ref.delta_w.mT  # (d1, d1); α = 1 in every preset
