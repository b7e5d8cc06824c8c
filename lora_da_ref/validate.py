"""How far is the production path from the exact theory? ``python -m lora_da_ref.validate``.

For each chosen layer ``W`` (d1, d2) = (d_in, d_out) of a small model and a calibration set, this
compares, against **exact** ground truths built from the dense per-token empirical Fisher ``J``
(:mod:`lora_da_ref.torch.exact`):

* the Fisher–gradient ``ΔW = −J⁻¹G`` (Eq. 21), the guidance matrix
  ``Ω = β/N Σ_i J⁻¹_[i] − α ΔWΔWᵀ`` (Eq. 19) and its ``A0`` = r smallest eigenvectors (Eqs. 5–8);
* with the production path's versions: K-FAC with a full ``Y`` (``kfac-full``, the paper's
  Algorithm 1), with a diagonal ``Y`` (``kfac-diag``), and the ``official`` preset (diagonal Y,
  σ-normalised ΔW, β = 0.03, batch-scaled scores, 10 LOBPCG iterations), each as returned by
  :func:`lora_da_ref.torch.init.layer_factors`;
* and, on the same Ω, ``eigh`` vs LOBPCG with the official 10 iterations vs LOBPCG run to tolerance.

Each method is compared with the exact counterpart **with its own settings** (β, α, N, the
σ-normalisation, the score scale and the G weighting), so the numbers measure the approximation
(K-FAC, diagonal Y, token mask, solver), not the choice of hyper-parameters.

Metrics per layer and method: ``‖ΔW−ΔW*‖/‖ΔW*‖``, ``‖Ω−Ω*‖_F/‖Ω*‖_F``, the largest principal angle
between ``A0`` and ``A0*`` (radians), the regret ``tr(A0ᵀΩ*A0) − (λ1*+…+λr*)`` ≥ 0 (Eq. 8), also
divided by ``r‖Ω*‖₂``, and ``max_i |λ_i − λ_i*| / ‖Ω*‖₂`` over the r smallest eigenvalues.

Built-in cases (``--case``): ``tiny-llama`` (a random 2-layer LLaMA, hidden 16, all seven
projections of layer 0) and ``token-mlp`` (a per-token MLP). ``--model DIR --data FILE.jsonl`` runs
on a local Hugging Face causal LM instead. ``--json`` prints JSON. On CPU both paths run in float64
(the exact path on a copy without HF's float32 casts); with ``--device cuda`` the production path
runs on a bfloat16 copy with float32 statistics, the exact path in float64.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lora_da_ref.linalg import principal_angles
from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.exact import (
    ExactFisherStatistics,
    TokenLossFn,
    causal_lm_token_losses,
    exact_fisher_variants,
    full_precision_copy,
)
from lora_da_ref.torch.fisher import DenseFisher, FisherMatrix, KroneckerFisher
from lora_da_ref.torch.guidance import fisher_gradient, guidance_matrix
from lora_da_ref.torch.init import find_target_modules, layer_factors, layer_seed
from lora_da_ref.torch.solvers import EigenResult, smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACStatistics, collect_statistics

__all__ = [
    "BUILTIN_CASES",
    "MAX_PARAMS",
    "METHODS",
    "ValidationCase",
    "build_parser",
    "format_report",
    "main",
    "validate",
]

MAX_PARAMS = 4096  # d1·d2 above this makes the dense J ((d1·d2)² entries) too big for a check
DEFAULT_RANK = 4  # built-in layers have d_in >= 12: r = 4 lets LOBPCG run (it needs d >= 3r)
Batch = dict[str, Any]


# ----------------------------------------------------------------------------- cases


@dataclass
class ValidationCase:
    """A model, its calibration batches, the layers to check and the per-token loss.

    ``token_losses(model, batch)`` returns the batch's per-token losses ``(T_b,)``; their mean is
    the batch loss the production path differentiates. ``label_shift`` as in LoraDAConfig.
    """

    id: str
    model: nn.Module
    batches: list[Batch]
    layers: list[str]
    token_losses: TokenLossFn = causal_lm_token_losses
    label_shift: int = 1
    description: str = ""


def _random_sequences(n: int, length: int, vocab: int, seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, vocab, (1, length), generator=gen) for _ in range(n)]  # no specials
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def tiny_llama_case(n_sequences: int = 32, length: int = 65, seed: int = 0) -> ValidationCase:
    """Random 2-layer LLaMA (hidden 16, MLP 32, 4 heads, 2 KV heads, vocab 64); the seven
    projections of layer 0; ``n_sequences`` random sequences of ``length`` tokens, batch size 1
    (2048 loss tokens by default: 4× the largest layer's d_in·d_out = 512, so J is invertible)."""
    from lora_da_ref.data import tiny_llama

    model = tiny_llama(seed, hidden=16, intermediate=32, heads=4, kv_heads=2, vocab=64)
    layers = [n for n, m in model.named_modules() if ".layers.0." in n and isinstance(m, nn.Linear)]
    batches = _random_sequences(n_sequences, length, 64, seed + 1)
    tokens = n_sequences * (length - 1)
    return ValidationCase("tiny-llama", model, batches, layers, description=f"{tokens} tokens")


def _mlp_token_losses(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(batch["inputs"].to(next(model.parameters()).dtype))  # (B, T, C)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )  # (B·T,)


def token_mlp_case(n_batches: int = 32, length: int = 64, seed: int = 0) -> ValidationCase:
    """Per-token MLP 12→16→16→16→10 (tanh), Laplace inputs, labels drawn from a random teacher.

    The three hidden layers are checked; the output layer is not: with all 10 softmax logits
    free its Fisher is singular (adding one vector to every column leaves the loss unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
            nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10),
        ).eval()  # fmt: skip
        teacher = nn.Linear(12, 10)
    batches = []
    for _ in range(n_batches):
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, length, 12))  # (1, T, 12)
        logits = teacher(x).detach() * 2.0  # (1, T, 10)
        y = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=gen).view(1, length)
        batches.append({"inputs": x, "labels": y})
    layers = ["0", "2", "4"]
    tokens = n_batches * length
    return ValidationCase(
        "token-mlp", model, batches, layers, _mlp_token_losses, 0, f"{tokens} tokens"
    )


def _mse_token_losses(model: nn.Module, batch: Batch) -> Tensor:
    dtype = next(model.parameters()).dtype
    f = model(batch["inputs"].to(dtype))  # (B, T, d2)
    return 0.5 * ((f - batch["targets"].to(dtype)) ** 2).sum(-1).flatten()  # (B·T,)


def kfac_exact_case(n_inputs: int = 64, n_residuals: int = 32, seed: int = 0) -> ValidationCase:
    """A control where K-FAC is exact: one linear layer 12→6, squared loss ``ℓ = ½‖f − y‖²``, on
    a *factorial* design. Every input ``x_i`` meets every residual ``e_j`` (``y = Wᵀx_i − e_j``),
    so the per-token scores are ``s = e_j`` and ``J = mean_ij (e_j e_jᵀ) ⊗ (x_i x_iᵀ) = Y ⊗ Z``
    exactly; ``kfac-full`` must agree with the exact path up to its damping λ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 6, bias=False)).eval()
    X = torch.randn(n_inputs, 12, generator=gen) + 0.3  # (M, 12), non-zero mean: G ≠ 0
    E = torch.randn(n_residuals, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 0.2
    with torch.no_grad():
        batches = []
        for x in X:  # one batch per input: T_b = n_residuals tokens, all equal
            inputs = x.expand(1, n_residuals, 12).clone()  # (1, m, 12)
            targets = model(inputs) - E.unsqueeze(0)  # (1, m, 6)
            mask = torch.ones(1, n_residuals, dtype=torch.long)
            batches.append({"inputs": inputs, "targets": targets, "attention_mask": mask})
    tokens = n_inputs * n_residuals
    return ValidationCase(
        "kfac-exact", model, batches, ["0"], _mse_token_losses, 0, f"{tokens} tokens, factorial"
    )


BUILTIN_CASES: dict[str, Callable[[], ValidationCase]] = {
    "tiny-llama": tiny_llama_case,
    "token-mlp": token_mlp_case,
    "kfac-exact": kfac_exact_case,
}


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A production configuration and how its exact counterpart is built."""

    config: Callable[..., LoraDAConfig]
    overrides: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "kfac-full": Method(LoraDAConfig.paper, {"output_factor": "full"}),
    "kfac-diag": Method(LoraDAConfig.paper, {"output_factor": "diagonal"}),
    "official": Method(LoraDAConfig.official),
}


@dataclass
class Guidance:
    """ΔW (d1, d2), Ω (d1, d1) and the settings that produced them."""

    delta_w: Tensor
    omega: Tensor
    sigma: float


def production_guidance(J: FisherMatrix, G: Tensor, config: LoraDAConfig) -> Guidance:
    """Eqs. (21) and (19) with the config's β, α, N and σ-normalisation (as layer_factors)."""
    delta_w = fisher_gradient(J, G)  # (d1, d2)
    sigma = float(torch.linalg.matrix_norm(delta_w, ord=2)) if config.normalize_delta else 1.0
    delta_w = delta_w / sigma
    omega = guidance_matrix(
        J, delta_w, config.n_train,
        variance_weight=config.variance_weight / sigma**2, bias_weight=config.bias_weight,
    )  # fmt: skip
    return Guidance(delta_w, omega, sigma)


# ----------------------------------------------------------------------------- metrics


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _angle(A: Tensor, B: Tensor) -> float:
    """Largest principal angle between col(A) and col(B), radians."""
    return float(principal_angles(_np(A), _np(B)).max())


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = _np(a), _np(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _spectral_norm(omega: Tensor) -> float:
    return float(np.abs(np.linalg.eigvalsh(_np(omega))).max())


def subspace_metrics(A: Tensor, values: Tensor, exact: Tensor, r: int) -> dict[str, float]:
    """Angle, regret ``tr(AᵀΩ*A) − Σλ*`` (Eq. 8) and eigenvalue error of ``A`` on the exact Ω*.

    Args:
        A: (d1, r) orthonormal columns (the method's A0).
        values: (r,) the method's eigenvalues (of its own Ω).
        exact: Ω* (d1, d1).
        r: the rank.
    """
    omega = _np(exact)
    lam, U = np.linalg.eigh(omega)  # ascending
    A_np = _np(A)
    optimum = float(lam[:r].sum())
    objective = float(np.trace(A_np.T @ omega @ A_np))
    scale = float(np.abs(lam).max()) or 1.0
    return {
        "angle": float(principal_angles(A_np, U[:, :r]).max()),
        "objective": objective,
        "optimum": optimum,
        "regret": objective - optimum,
        "rel_regret": (objective - optimum) / (r * scale),
        "eig_err": float(np.abs(_np(values) - lam[:r]).max() / scale),
    }


# ----------------------------------------------------------------------------- validation


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
        seed: the solver seed (per-layer seeds as in layer_factors).

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
    ref = production_guidance(J_exact, exact.G[name], config)
    ref_eig = smallest_eigenpairs(ref.omega, r, solver="eigh")
    group = stats.group_of[name]
    to64 = dict(device="cpu", dtype=torch.float64)
    J_kfac = KroneckerFisher(
        stats.Y[name].to(**to64), stats.Z[group].to(**to64), damping=config.damping
    )
    ours = production_guidance(J_kfac, stats.G[name].to(**to64), config)
    factors = layer_factors(stats, name, config)  # the production result
    gamma = 1.0 if config.scale_gamma is None else math.sqrt(config.scale_gamma)
    A0 = torch.linalg.qr(factors.A.to(torch.float64) * gamma)[0]  # (d1, r); float32 → exact AᵀA = I
    seed = layer_seed(config.seed, name)
    metrics = subspace_metrics(A0, factors.eigenvalues, ref.omega, r)
    metrics |= {
        "J_err": _relative(J_kfac.to_dense(), J_exact.to_dense()),
        "G_err": _relative(stats.G[name], exact.G[name]),
        "delta_w_err": _relative(ours.delta_w, ref.delta_w),
        "omega_err": _relative(ours.omega, ref.omega),
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
    return _angle(eig.vectors, A0)


def _exact_summary(
    exact: ExactFisherStatistics, name: str, J: DenseFisher, ref: Guidance, eig: EigenResult
) -> dict[str, Any]:
    d1, d2 = exact.shapes[name]
    spectrum = np.linalg.eigvalsh(_np(exact.J[name]))  # ascending
    variance = ref.omega + _scaled_bias(ref)
    return {
        "tokens": exact.tokens,
        "params": d1 * d2,
        "cond_J": float(spectrum[-1] / max(spectrum[0], np.finfo(float).tiny)),
        "damping_J": J.damping["J"],
        "var_over_bias": _spectral_norm(variance) / max(_spectral_norm(_scaled_bias(ref)), 1e-300),
        "eigenvalues": _np(eig.eigenvalues).tolist(),
    }


def _scaled_bias(ref: Guidance) -> Tensor:
    return ref.delta_w @ ref.delta_w.mT  # (d1, d1); α = 1 in every preset


def solver_comparison(omega: Tensor, r: int, seed: int) -> dict[str, dict[str, Any]]:
    """eigh vs LOBPCG (official: 10 iterations, seeded start, no check) vs LOBPCG to tolerance on
    one Ω: angle to eigh's subspace, eigenvalue error / ‖Ω‖₂, iterations, residual, fallback."""
    ref = smallest_eigenpairs(omega, r, solver="eigh")
    runs = {
        "eigh": ref,
        "lobpcg-10": smallest_eigenpairs(omega, r, solver="lobpcg", official=True, seed=seed),
        "lobpcg-tol": smallest_eigenpairs(omega, r, solver="lobpcg", seed=seed),
    }
    scale = _spectral_norm(omega) or 1.0
    out = {}
    for key, res in runs.items():
        diag = res.diagnostics
        out[key] = {
            "angle": _angle(res.vectors, ref.vectors),
            "eig_err": float((res.eigenvalues - ref.eigenvalues).abs().max()) / scale,
            "iterations": diag.get("iterations"),
            "residual": diag.get("residual"),
            "fallback": diag.get("fallback"),
        }
    return out


# ----------------------------------------------------------------------------- report


def format_report(report: dict[str, Any]) -> str:
    """The per-layer tables of a :func:`validate` report, as text."""
    lines = [
        f"LoRA-DA validation: case {report['case']} ({report.get('description', '')}), "
        f"r = {report['rank']}, N = {report['n_train']}, device {report['device']}, "
        f"statistics {report['stats_dtype']}, {report['seconds']:.1f} s"
    ]
    for name, layer in report["layers"].items():
        lines += ["", *_layer_lines(name, layer)]
    return "\n".join(lines)


def _layer_lines(name: str, layer: dict[str, Any]) -> list[str]:
    d1, d2 = layer["shape"]
    ex = next(iter(layer["exact"].values()))
    head = (
        f"{name}  W {d1}x{d2}  tokens {ex['tokens']}  cond(J) {ex['cond_J']:.2e}  "
        f"var/bias {ex['var_over_bias']:.2g}"
    )
    rows = [
        head,
        f"  {'method':<10}{'G err':>9}{'J err':>9}{'dW err':>9}{'Omega err':>10}{'angle':>9}"
        f"{'rel regret':>11}{'eig err':>9}  solver",
    ]
    for method, m in layer["methods"].items():
        solver = m["solver"] + (" (fallback)" if m["fallback"] else "")
        rows.append(
            f"  {method:<10}{m['G_err']:>9.1e}{m['J_err']:>9.1e}{m['delta_w_err']:>9.1e}"
            f"{m['omega_err']:>10.1e}{m['angle']:>9.1e}{m['rel_regret']:>11.1e}"
            f"{m['eig_err']:>9.1e}  {solver}"
        )
    rows.append(f"  {'solver':<12}{'on Omega of':<20}{'angle':>9}{'eig err':>10}{'iters':>7}"
                f"{'residual':>10}")  # fmt: skip
    for omega_of, runs in layer["solvers"].items():
        for key, s in runs.items():
            its = "-" if s["iterations"] is None else str(s["iterations"])
            note = "  fallback: " + s["fallback"][:48] if s["fallback"] else ""
            rows.append(
                f"  {key:<12}{omega_of:<20}{s['angle']:>9.2e}{s['eig_err']:>10.2e}{its:>7}"
                f"{s['residual']:>10.2e}{note}"
            )
    return rows


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m lora_da_ref.validate`` / ``lora-da validate``."""
    p.add_argument("--case", choices=sorted(BUILTIN_CASES), nargs="+", default=None,
                   help="built-in cases (default: all; ignored with --model)")  # fmt: skip
    p.add_argument("--model", default=None, help="local HF causal LM directory (with tokenizer)")
    p.add_argument("--data", default=None, help='JSONL calibration texts ({"text": ...})')
    p.add_argument("--layers", nargs="+", default=None,
                   help="module names or suffixes (default: the linear layers of block 0)")  # fmt: skip
    p.add_argument("--samples", type=int, default=64, help="first N texts of --data")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts (tokens)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank r")
    p.add_argument("--n-train", type=int, default=None, help="N (default: LoraDAConfig's)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Run the validation for the parsed ``args``; print tables (or JSON); return 0."""
    cases = _cases(args)
    reports = [
        validate(
            case,
            rank=args.rank,
            n_train=args.n_train,
            device=args.device,
            methods=args.methods,
            seed=args.seed,
        )
        for case in cases
    ]
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def _cases(args: argparse.Namespace) -> list[ValidationCase]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available on this machine")
    if args.model is None:
        if args.data is not None:
            raise ValueError("--data needs --model")
        names = args.case or sorted(BUILTIN_CASES)
        cases = [BUILTIN_CASES[n]() for n in names]
        for case in cases:
            case.layers = _choose_layers(case.model, args.layers, case.layers)
        return cases
    if args.data is None:
        raise ValueError("--model needs --data (a JSONL file of calibration texts)")
    return [_hf_case(args)]


def _choose_layers(model: nn.Module, layers: list[str] | None, default: list[str]) -> list[str]:
    if not layers:
        return default
    return list(find_target_modules(model, layers))


def _hf_case(args: argparse.Namespace) -> ValidationCase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_da_ref.data import read_jsonl_texts, tokenize_batches

    texts = read_jsonl_texts(args.data, limit=args.samples)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = tokenize_batches(tokenizer, texts, max_length=args.max_length, batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers.0." in n]
    layers = _choose_layers(model, args.layers, blocks)
    return ValidationCase(str(args.model), model, batches, layers, description=str(args.data))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_da_ref.validate",
        description="Compare the LoRA-DA production path with the exact theory, layer by layer.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"validate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
