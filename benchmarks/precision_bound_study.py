"""Why ``precision_bound`` is loose on SmolLM2: its two approximations measured one at a time.

Usage: python benchmarks/precision_bound_study.py --stats-cache DIR [--angles F.json] [--out F.json]
       python benchmarks/precision_bound_study.py --layers-from F.json [--angles F.json] [--out F.json]

Reads the float32/float64 statistics that ``benchmarks/precision.py --stats-cache DIR`` cached
(SmolLM2-135M-Instruct, 64 HumanEval texts, one ``(s32, s64)`` pair per layer group) and the
measured float32-vs-float64 angles of that run (``--angles``: its ``--per-layer`` JSON; by default
``results/precision_smollm2_measured_rounding.json``, the committed run, whose pass measured its
rounding; ``results/precision_bound_smollm2.json`` is the run before that measurement). Per
layer (diagonal Y, the ``default`` preset) it records:

* **the rounding model against the real rounding**: ``‖Z32 − Z64‖_F / ‖u·D 1 Dᵀ‖_F`` (D =
  diag(√Z_ii): the model's root-mean-square error), likewise for the diagonal Y (``u·|y|``) and
  G (``u·√(ρ_i κ_j)``). 1 means the model has the right size; the spread over layers is how far
  any per-entry model built from the finished statistics can be right;
* **the gap approximation**: the same first-order model with the complement of span(A0) resolved
  into Ω's eigenvectors, ``Σ_{j>r} |v_jᵀ δΩ a_k|²/(λ_j − λ_k)²`` (the full spectrum of Ω, by a
  dense ``eigh``) instead of ``‖P⊥ δΩ a_k‖²/(λ_{r+1} − λ_k)²``; the Δ terms keep
  ``min(‖Δ‖₂/(λ_{r+1} − λ_k), ‖W_k V⊥ᵀΔ‖_F)``, both valid;
* **the gap with the exact perturbation** (``exact_gap_bound``): the single-gap first-order
  bound ``atan ‖(‖P⊥ δΩ a_k‖/(λ_{r+1} − λ_k))_k‖`` with the real ``δΩ`` (float32 Ω − float64 Ω):
  what ``precision_bound`` would give if it knew the rounding exactly, entry by entry; its ratio
  to the angle is the part of the looseness that no rounding model can remove;
* ``bound``: ``precision_bound`` as the cheap tier computes it (scaled to the rounding the pass
  measured, when the cached statistics carry the measurement), and the measured ``angle``.

Prints a JSON summary (median, min, max of each ratio over layers) and writes every layer with
``--out``. Costs one dense ``eigh`` of Ω and one float64 solve per layer beyond the solve:
≈ 10 min on one core.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics as st
import sys
from typing import Any

import torch

import lora_da_ref.torch.factors as F
from lora_da_ref.torch.config import LoraDAConfig

U32 = torch.finfo(torch.float32).eps / 2


def rounding_vs_model(s32: Any, s64: Any, name: str) -> dict[str, float | None]:
    """The real rounding of each statistic over the model's root-mean-square size."""
    group = s64.group_of[name]
    Z64 = s64.Z[group].double()
    d = Z64.diagonal().clamp_min(0).sqrt()
    z = float((s32.Z[group].double() - Z64).norm() / (U32 * torch.outer(d, d)).norm())
    Y64 = s64.Y[name].double()
    y = None
    if Y64.ndim == 1:
        y = float((s32.Y[name].double() - Y64).norm() / (U32 * Y64.abs()).norm())
    G64 = s64.G[name].double()
    rho, kappa = G64.square().mean(1).sqrt(), G64.square().mean(0).sqrt()
    g_model = U32 * (rho[:, None] * kappa[None, :]).sqrt()
    g = float((s32.G[name].double() - G64).norm() / g_model.norm())
    out = {"z_error_over_model": z, "y_error_over_model": y, "g_error_over_model": g}
    for kind, key in (("z", group), ("g", name)):  # the pass's measurement against the real
        measured = s32.rounding.get(f"{kind.upper()}/{key}")
        real = float(
            (
                getattr(s32, kind.upper())[key].double() - getattr(s64, kind.upper())[key].double()
            ).norm()
        )
        out[f"{kind}_measured_over_real"] = None if measured is None else measured / real
    return out


def spectral_bound(stats: Any, name: str, config: Any, J: Any, guide: Any, eig: Any) -> float:
    """``precision_bound``'s model (scaled to the rounding the pass measured, where it did) with
    the complement resolved into Ω's eigenvectors."""
    spectrum, vectors = torch.linalg.eigh(guide.omega.double())
    r = eig.vectors.shape[1]
    V, lam = eig.vectors.double(), eig.eigenvalues.double()
    Vc, lc = vectors[:, r:], spectrum[r:]  # the complement, (d1, d1 − r)
    weight = 1.0 / (lc[:, None] - lam[None, :]).square()  # (d1 − r, r)
    delta = guide.delta_w
    X, Q = delta.mT @ V, J.z_inverse()
    QV = Q @ V
    c = guide.variance_coefficient * float(J.y_inverse_trace())
    alpha = abs(guide.bias_weight)
    nd = 1.0 if config.normalize_delta else float(torch.linalg.matrix_norm(delta, 2))
    dz = stats.Z[stats.group_of[name]].diagonal().double().clamp_min(0).sqrt()
    Y = stats.Y[name].double()
    inv = (Y + J.damping["Y"]).reciprocal()
    dc = c * float((Y.abs() * inv * inv).norm()) / float(inv.sum())
    G = stats.G[name].double()
    rho, kappa = G.square().mean(1).sqrt().sqrt(), G.square().mean(0).sqrt().sqrt()

    def w(M: torch.Tensor) -> torch.Tensor:  # ‖W_k V⊥ᵀ M‖_F per column k, (r,)
        return ((Vc.mT @ M).square().sum(1)[:, None] * weight).sum(0).sqrt()

    def cols(M: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(M, dim=0)

    w_delta = torch.minimum(nd / (spectrum[r] - lam), w(delta))
    e_z = w(Q * dz[None, :]) * lam.abs() * cols(dz[:, None] * V) + alpha * w_delta * float(
        (dz[:, None] * delta).norm()
    ) * cols(dz[:, None] * QV)
    e_y = dc * ((Vc.mT @ QV).square() * weight).sum(0).sqrt() + 2 * alpha * w_delta * cols(
        X * (Y.abs() * inv)[:, None]
    )
    e_g = (alpha / guide.sigma) * (
        w(Q * rho[None, :]) * cols(kappa[:, None] * (X * inv[:, None]))
        + w_delta * float((inv * kappa).norm()) * cols(rho[:, None] * QV)
    )
    c_z, c_y, c_g = F.rounding_scales(stats, name, U32)  # the measured size, as the bound's
    turn = U32 * torch.sqrt((c_z * e_z).square() + (c_y * e_y).square() + (c_g * e_g).square())
    return float(torch.atan(turn.norm()))


def exact_gap_bound(sol32: Any, sol64: Any) -> float:
    """The single-gap first-order bound with the real ``δΩ = Ω₃₂ − Ω₆₄`` (both σ-normalised)."""
    V, lam = sol32.eig.vectors.double(), sol32.eig.eigenvalues.double()
    gaps = lam[-1] + float(sol32.eig.diagnostics["gap"]) - lam  # λ_{r+1} − λ_k
    P = (sol32.guidance.omega.double() - sol64.guidance.omega.double()) @ V
    P = P - V @ (V.mT @ P)  # P⊥ δΩ a_k
    return float(torch.atan(torch.linalg.vector_norm(torch.linalg.vector_norm(P, dim=0) / gaps)))


def run(cache: str, angles: dict[str, float]) -> dict[str, Any]:
    config = LoraDAConfig(dtype=torch.float32, diagnostics="cheap")
    reference = config.replace(dtype=torch.float64, diagnostics="off")
    captured: dict[str, float] = {}
    original = F.precision_bound

    def spy(stats: Any, name: str, cfg: Any, J: Any, guide: Any, eig: Any) -> float | None:
        captured["spectral"] = spectral_bound(stats, name, cfg, J, guide, eig)
        return original(stats, name, cfg, J, guide, eig)

    layers: dict[str, dict] = {}
    F.precision_bound = spy
    try:
        paths = sorted(
            glob.glob(os.path.join(cache, "*.pt")), key=lambda p: int(p[:-3].split("/")[-1])
        )
        for path in paths:
            s32, s64 = torch.load(path, weights_only=False)
            z_factors: dict = {}
            z64: dict = {}
            for name in s32.G:
                if s32.Y[name].ndim != 1 or name not in angles:
                    continue
                sol = F.solve_layer(s32, name, config, z_factors)
                sol64 = F.solve_layer(s64, name, reference, z64, probe=False)
                layers[name] = {
                    "angle": angles[name],
                    "bound": sol.diagnostics["precision_bound"],
                    "spectral_bound": captured["spectral"],
                    "exact_gap_bound": exact_gap_bound(sol, sol64),
                    "rounding_scales": F.rounding_scales(s32, name, U32),
                    **rounding_vs_model(s32, s64, name),
                }
            print(f"{len(layers)} layers", file=sys.stderr, flush=True)
            del s32, s64
    finally:
        F.precision_bound = original
    return {"summary": summarise(layers), "per_layer": layers}


def summarise(layers: dict[str, dict]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"median": st.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {"layers": len(layers)}
    for key in (
        "z_error_over_model", "y_error_over_model", "g_error_over_model",
        "z_measured_over_real", "g_measured_over_real",
    ):  # fmt: skip
        values = [v[key] for v in layers.values() if v.get(key) is not None]
        out[key] = spread(values) if values else None
    for key in ("bound", "spectral_bound", "exact_gap_bound"):
        ratios = {n: v[key] / v["angle"] for n, v in layers.items() if v["angle"] > 0}
        out[f"{key}_over_angle"] = spread(list(ratios.values()))
        out[f"{key}_below_angle"] = sorted(n for n, x in ratios.items() if x < 1)
        out[f"{key}_above_1e-3"] = sum(v[key] > 1e-3 for v in layers.values())
    worst = max(layers, key=lambda n: layers[n]["angle"])
    out["worst_layer"] = {"name": worst, **layers[worst]}
    return out


def load_angles(path: str) -> dict[str, float]:
    """``{layer: measured angle}`` from benchmarks/precision.py's JSON or a bound-vs-angle one."""
    data = json.load(open(path))
    per_layer = data["config"]["per_layer"] if "config" in data else data["per_layer"]
    return {n: v["angle"] for n, v in per_layer.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stats-cache", help="benchmarks/precision.py's --stats-cache")
    p.add_argument(
        "--angles",
        default=os.path.join(
            os.path.dirname(__file__), "results", "precision_smollm2_measured_rounding.json"
        ),
        help="the measured angles of the same cached statistics: benchmarks/precision.py "
        "--per-layer --out JSON, or the bound-vs-angle JSON made from it (the default)",
    )
    p.add_argument("--out", default=None, help="also write every layer here")
    p.add_argument(
        "--layers-from", default=None, help="a previous --out: re-summarise it with --angles"
    )
    args = p.parse_args(argv)
    if (args.stats_cache is None) == (args.layers_from is None):
        p.error("give one of --stats-cache and --layers-from")
    torch.set_num_threads(1)
    angles = load_angles(args.angles)
    if args.layers_from:
        layers = json.load(open(args.layers_from))["per_layer"]
        for name, v in layers.items():
            v["angle"] = angles[name]
        result = {"summary": summarise(layers), "per_layer": layers}
    else:
        result = run(args.stats_cache, angles)
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
