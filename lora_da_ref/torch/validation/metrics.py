"""Metrics comparing a method's result with the exact one: subspaces (principal angles, regret on
the exact Ω, Eq. 8), relative errors, and eigensolvers against dense ``eigh`` on one Ω."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lora_da_ref.reference.linalg import principal_angles
from lora_da_ref.torch.solvers import smallest_eigenpairs

__all__ = [
    "largest_angle",
    "relative_error",
    "solver_comparison",
    "spectral_norm",
    "subspace_metrics",
    "to_numpy",
]


def to_numpy(t: Tensor) -> np.ndarray:
    """float64 NumPy copy on the CPU."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def largest_angle(A: Tensor, B: Tensor) -> float:
    """Largest principal angle between col(A) and col(B), radians."""
    return float(principal_angles(to_numpy(A), to_numpy(B)).max())


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖_F / ‖b‖_F``."""
    a, b = to_numpy(a), to_numpy(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def spectral_norm(omega: Tensor) -> float:
    """``‖Ω‖₂`` of a symmetric Ω."""
    return float(np.abs(np.linalg.eigvalsh(to_numpy(omega))).max())


def subspace_metrics(A: Tensor, values: Tensor, exact: Tensor, r: int) -> dict[str, float]:
    """Angle, regret ``tr(AᵀΩ*A) − Σλ*`` (Eq. 8) and eigenvalue error of ``A`` on the exact Ω*.

    Args:
        A: (d1, r) orthonormal columns (the method's A0).
        values: (r,) the method's eigenvalues (of its own Ω).
        exact: Ω* (d1, d1).
        r: the rank.
    """
    omega = to_numpy(exact)
    lam, U = np.linalg.eigh(omega)  # ascending
    A_np = to_numpy(A)
    optimum = float(lam[:r].sum())
    objective = float(np.trace(A_np.T @ omega @ A_np))
    scale = float(np.abs(lam).max()) or 1.0
    return {
        "angle": float(principal_angles(A_np, U[:, :r]).max()),
        "objective": objective,
        "optimum": optimum,
        "regret": objective - optimum,
        "rel_regret": (objective - optimum) / (r * scale),
        "eig_err": float(np.abs(to_numpy(values) - lam[:r]).max() / scale),
    }


def solver_comparison(omega: Tensor, r: int, seed: int) -> dict[str, dict[str, Any]]:
    """eigh vs LOBPCG (official: 10 iterations, seeded start, no check) vs LOBPCG to tolerance on
    one Ω: angle to eigh's subspace, eigenvalue error / ‖Ω‖₂, iterations, residual, fallback."""
    ref = smallest_eigenpairs(omega, r, solver="eigh")
    runs = {
        "eigh": ref,
        "lobpcg-10": smallest_eigenpairs(omega, r, solver="lobpcg", official=True, seed=seed),
        "lobpcg-tol": smallest_eigenpairs(omega, r, solver="lobpcg", seed=seed),
    }
    scale = spectral_norm(omega) or 1.0
    out = {}
    for key, res in runs.items():
        diag = res.diagnostics
        out[key] = {
            "angle": largest_angle(res.vectors, ref.vectors),
            "eig_err": float((res.eigenvalues - ref.eigenvalues).abs().max()) / scale,
            "iterations": diag.get("iterations"),
            "residual": diag.get("residual"),
            "fallback": diag.get("fallback"),
        }
    return out
