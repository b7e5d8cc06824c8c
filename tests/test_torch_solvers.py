"""Eigensolvers of the torch path: LOBPCG to tolerance vs eigh, fallbacks, the official preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_da_ref._linalg import principal_angles
from lora_da_ref.torch import SOLVERS, smallest_eigenpairs
from lora_da_ref.torch.solvers import default_tol, fix_signs, relative_residual
from tests.torch_cases import single_thread  # noqa: F401  (autouse fixture)

# Davis–Kahan sin Θ theorem: sin θ_max ≤ ‖ΩA − AΛ‖_F / δ, δ = λ_{r+1} − λ_r (exact spectrum).
# Factor 2 covers the perturbation of λ_r itself by the residual (δ is estimated from eigh).
DAVIS_KAHAN_SAFETY = 2.0
# Courant–Fischer holds up to round-off of tr(AᵀΩA): a few eps · r · ‖Ω‖.
OBJECTIVE_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def indefinite_omega(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ω = β·Z⁻¹ − ΔWΔWᵀ-like: SPD variance part minus a rank-deficient bias part (indefinite)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    Zinv = torch.linalg.inv(X @ X.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64))
    D = torch.randn(d, max(2, d // 4), generator=gen, dtype=torch.float64)
    omega = 0.05 * Zinv - D @ D.T / d
    return (0.5 * (omega + omega.T)).to(dtype)


def _dk_bound(omega: torch.Tensor, result, r: int) -> float:
    values = torch.linalg.eigvalsh(omega.double())
    gap = float(values[r] - values[r - 1])
    A = result.vectors.double()
    R = omega.double() @ A - A * result.eigenvalues.double()
    return DAVIS_KAHAN_SAFETY * float(R.norm()) / gap


def _angle(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(principal_angles(A.double().numpy(), B.double().numpy()).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,r,seed", [(40, 4, 0), (96, 8, 1), (150, 3, 2)])
def test_lobpcg_to_tolerance_matches_eigh(dtype, d, r, seed):
    omega = indefinite_omega(d, seed, dtype)
    exact = smallest_eigenpairs(omega, r, solver="eigh")
    lob = smallest_eigenpairs(omega, r, solver="lobpcg", seed=seed)
    assert lob.diagnostics["solver"] == "lobpcg", lob.diagnostics["fallback"]
    assert lob.diagnostics["residual"] <= default_tol(dtype)
    angle = _angle(lob.vectors, exact.vectors)
    bound = _dk_bound(omega, lob, r)
    assert angle <= bound, f"angle {angle:.3g} > Davis–Kahan bound {bound:.3g}"
    assert float(torch.linalg.eigvalsh(omega)[0]) < 0 < float(torch.linalg.eigvalsh(omega)[-1])


def test_falls_back_to_eigh_when_d_below_3r():
    omega = indefinite_omega(11, 0)
    res = smallest_eigenpairs(omega, 4, solver="lobpcg")
    assert res.diagnostics["solver"] == "eigh" and "3r" in res.diagnostics["fallback"]
    assert torch.equal(res.vectors, smallest_eigenpairs(omega, 4, solver="eigh").vectors)


def test_falls_back_when_not_converged():
    """One iteration cannot meet the tolerance: the residual check must reject it."""
    omega = indefinite_omega(120, 3)
    res = smallest_eigenpairs(omega, 6, solver="lobpcg", niter=1)
    assert res.diagnostics["solver"] == "eigh"
    assert "residual" in res.diagnostics["fallback"]
    assert res.diagnostics["lobpcg"]["residual"] > default_tol(omega.dtype)
    assert res.diagnostics["residual"] <= default_tol(omega.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_official_preset_runs_ten_iterations_without_check(dtype):
    omega = indefinite_omega(120, 4, dtype)
    res = smallest_eigenpairs(omega, 8, solver="lobpcg", official=True, niter=10, seed=9)
    assert res.diagnostics["solver"] == "lobpcg" and res.diagnostics["fallback"] is None
    assert res.diagnostics["iterations"] <= 10 and math.isfinite(res.diagnostics["residual"])
    # Courant–Fischer: any orthonormal A has tr(AᵀΩA) ≥ λ1 + … + λr.
    optimum = float(torch.linalg.eigvalsh(omega.double())[:8].sum())
    A = res.vectors.double()
    assert float(torch.trace(A.T @ omega.double() @ A)) >= optimum - OBJECTIVE_ATOL[dtype]


def test_courant_fischer_check_can_fail():
    """A non-orthonormal "solution" (2·A) breaks the inequality — the check has teeth."""
    omega = indefinite_omega(60, 5)
    A = 2 * smallest_eigenpairs(omega, 4).vectors
    optimum = float(torch.linalg.eigvalsh(omega)[:4].sum())
    assert float(torch.trace(A.T @ omega @ A)) < optimum - 1e-3


def test_solvers_are_deterministic_and_sign_fixed():
    omega = indefinite_omega(90, 6, torch.float32)
    for name in SOLVERS:
        a = smallest_eigenpairs(omega, 5, solver=name, seed=3)
        b = smallest_eigenpairs(omega, 5, solver=name, seed=3)
        assert torch.equal(a.vectors, b.vectors) and torch.equal(a.eigenvalues, b.eigenvalues)
        idx = a.vectors.abs().argmax(dim=0)
        assert bool((a.vectors[idx, torch.arange(5)] > 0).all()), f"{name}: sign convention"
        assert bool((a.eigenvalues[1:] >= a.eigenvalues[:-1]).all()), f"{name}: not ascending"


def test_fix_signs_and_residual_helpers():
    V = torch.tensor([[0.1, -0.9], [-0.5, 0.2]])
    assert torch.equal(fix_signs(V), torch.tensor([[-0.1, 0.9], [0.5, -0.2]]))
    omega = torch.diag(torch.tensor([-1.0, 2.0]))
    assert relative_residual(omega, torch.tensor([-1.0]), torch.tensor([[1.0], [0.0]])) == 0.0
    assert relative_residual(omega, torch.tensor([2.0]), torch.tensor([[1.0], [0.0]])) > 1.0


def test_shifted_lobpcg_option_still_returns_the_right_subspace():
    omega = indefinite_omega(80, 7)
    res = smallest_eigenpairs(omega, 4, solver="lobpcg", shift=True)  # may fall back: fine
    assert _angle(res.vectors, smallest_eigenpairs(omega, 4).vectors) <= _dk_bound(omega, res, 4)


def test_bad_inputs_raise():
    omega = indefinite_omega(10, 0)
    with pytest.raises(ValueError, match="r must be"):
        smallest_eigenpairs(omega, 11)
    with pytest.raises(ValueError, match="r must be"):
        smallest_eigenpairs(omega, 0)
    with pytest.raises(ValueError, match="unknown solver"):
        smallest_eigenpairs(omega, 2, solver="arpack")
    with pytest.raises(ValueError, match="square"):
        smallest_eigenpairs(omega[:, :5], 2)
    with pytest.raises(ValueError, match="non-finite"):
        smallest_eigenpairs(omega * float("inf"), 2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        smallest_eigenpairs(np.eye(3), 1)
