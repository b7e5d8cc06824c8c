"""Eigensolvers of the torch path: LOBPCG to tolerance vs eigh, fallbacks, the official preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_da_ref import principal_angles
from lora_da_ref.torch.solvers import (
    SOLVERS,
    default_tol,
    fix_signs,
    relative_residual,
    smallest_eigenpairs,
    torch_lobpcg,
)
from tests.torch_cases import single_thread  # noqa: F401  (autouse fixture)

# Davis–Kahan sin Θ theorem: sin θ_max ≤ ‖ΩA − AΛ‖_F / δ, δ = λ_{r+1} − λ_r (exact spectrum).
# Factor 2 covers the perturbation of λ_r itself by the residual (δ is estimated from eigh).
DAVIS_KAHAN_SAFETY = 2.0


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


def spectrum_omega(
    d: int, r: int, wanted: tuple[float, float], unwanted: tuple[float, float], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ω = Q diag(λ) Qᵀ (float64, Q Haar): the r smallest λ evenly in ``wanted``, the other d − r
    evenly in ``unwanted``; returns Ω and the exact eigenspace Q[:, :r]."""
    rng = np.random.default_rng([seed, d, r])
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))
    lam = np.concatenate([np.linspace(*wanted, r), np.linspace(*unwanted, d - r)])
    omega = (Q * lam) @ Q.T
    return torch.from_numpy(0.5 * (omega + omega.T)), torch.from_numpy(Q[:, :r].copy())


def _relative_regret(omega: torch.Tensor, A: torch.Tensor, r: int) -> float:
    """(tr(AᵀΩA) − (λ1+…+λr)) / (r‖Ω‖₂) after re-orthonormalising A (≥ 0 by Courant–Fischer)."""
    A = torch.linalg.qr(A.double())[0]
    values = torch.linalg.eigvalsh(omega.double())
    regret = float(torch.trace(A.T @ omega.double() @ A) - values[:r].sum())
    return regret / (r * float(values.abs().max()))


# The accuracy asked of an eigensolver (the eigensolver study's target). For an A at largest
# principal angle θ from the exact space, regret ≤ Σ_j sin²θ_j (λ_max − λ_min) ≤ 2 r ‖Ω‖₂ sin²θ.
TARGET_ANGLE = 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [64, 128])
def test_official_ten_iterations_succeed_on_a_well_separated_spectrum(dtype, d):
    """Official preset (10 iterations, no check) where it must succeed: relative gap 0.5
    (λ_r = −0.5, λ_{r+1} = 0, ‖Ω‖₂ = 1), d ≤ 128. Measured angle 7e-6 (d = 64), 4e-5 (d = 128)."""
    omega, exact = spectrum_omega(d, 8, (-1.0, -0.5), (0.0, 1.0))
    res = smallest_eigenpairs(omega.to(dtype), 8, solver="lobpcg", official=True, seed=9)
    assert res.diagnostics["solver"] == "lobpcg" and res.diagnostics["fallback"] is None
    assert res.diagnostics["iterations"] <= 10
    angle = _angle(res.vectors, exact)
    assert angle <= TARGET_ANGLE, f"official LOBPCG angle {angle:.3g} rad > {TARGET_ANGLE}"
    assert _relative_regret(omega, res.vectors, 8) <= 2 * TARGET_ANGLE**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_official_ten_iterations_fail_at_llama_size_with_a_small_gap(dtype):
    """A documented failure, asserted: d = 576 (SmolLM2's hidden size), r = 8, relative gap 1e-3.
    Ten iterations are far from converged (measured 0.91–1.54 rad over seeds 0–4); LOBPCG run to
    tolerance with the residual check, on the same Ω and start, is within 2e-3 rad."""
    omega, exact = spectrum_omega(576, 8, (-1.0, -0.5), (-0.5 + 1e-3, 1.0))
    official = smallest_eigenpairs(omega.to(dtype), 8, solver="lobpcg", official=True, seed=0)
    assert official.diagnostics["fallback"] is None  # it is LOBPCG's answer, not eigh's
    assert _angle(official.vectors, exact) > 0.5, "official LOBPCG now converges here: update"
    assert _relative_regret(omega, official.vectors, 8) > 1e-3
    checked = smallest_eigenpairs(omega.to(dtype), 8, solver="lobpcg", seed=0)
    assert _angle(checked.vectors, exact) <= _dk_bound(omega, checked, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("niter", [3, 10, 200])
def test_torch_lobpcg_is_torch_lobpcg_with_its_iteration_count(dtype, niter):
    """The worker built by ``torch_lobpcg`` (no tracker, so no class attribute switched on and
    off) is ``torch.lobpcg``'s: bit-identical values and vectors, and the iteration count that
    ``torch.lobpcg``'s tracker sees, whether the cap (3, 10) or the tolerance (200) stops it.
    Catches ``largest`` or ``tol`` not passed as torch passes them, and an off-by-one count
    (the ortho tolerances and ``ortho_i_max`` do not change the result on this Ω)."""
    omega, _ = spectrum_omega(96, 4, (-1.0, -0.5), (0.0, 1.0), seed=3)
    A = omega.to(dtype)
    X0 = torch.linalg.qr(torch.randn(96, 4, generator=torch.Generator().manual_seed(1)))[0]
    X0 = X0.to(dtype)
    tol = default_tol(dtype)
    steps: list[int] = []
    values, vectors = torch.lobpcg(
        A, k=4, X=X0.clone(), niter=niter, tol=tol, largest=False,
        tracker=lambda worker: steps.append(worker.ivars["istep"]),
    )  # fmt: skip
    got_values, got_vectors, iterations = torch_lobpcg(A, X0.clone(), niter, tol)
    assert torch.equal(got_values, values) and torch.equal(got_vectors, vectors)
    assert iterations == len(steps) == steps[-1]
    assert (iterations == niter) == (niter < 200), iterations  # 200: stopped by the tolerance


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shifted_lobpcg_converges_and_returns_the_right_subspace(dtype):
    """shift=True on an indefinite Ω whose unwanted spectrum is clustered ([0.9, 1]): LOBPCG on
    Ω + ‖Ω‖_F·I itself passes the residual check (no eigh fallback) and its subspace is right.

    Whether the shifted run passes our check depends on how far its last step overshoots torch's
    own (looser, see below) stopping rule: on this spectrum it passed in 23 of 32 runs (d = 40, 80,
    seeds 0–7, float32/64), so the case is pinned (seed 1, both dtypes pass)."""
    omega, exact = spectrum_omega(80, 4, (-1.0, -0.99), (0.9, 1.0), seed=1)
    res = smallest_eigenpairs(omega.to(dtype), 4, solver="lobpcg", shift=True)
    assert res.diagnostics["solver"] == "lobpcg", res.diagnostics["fallback"]
    assert res.diagnostics["fallback"] is None and res.diagnostics["shift"] > 0
    assert res.diagnostics["residual"] <= default_tol(dtype)
    angle = _angle(res.vectors, exact)
    assert angle <= min(_dk_bound(omega, res, 4), TARGET_ANGLE), angle
    expected = torch.linspace(-1.0, -0.99, 4, dtype=torch.float64)
    assert torch.allclose(res.eigenvalues.double(), expected, rtol=0, atol=10 * default_tol(dtype))


def test_shifted_lobpcg_stops_short_of_the_check_on_a_spread_spectrum():
    """Documented limitation (module docstring): torch stops relative to ‖Ω + cI‖ ≈ 2‖Ω‖_F, so
    on a spread spectrum the shifted run ends just above our tolerance and eigh is used."""
    omega = indefinite_omega(80, 7)
    res = smallest_eigenpairs(omega, 4, solver="lobpcg", shift=True)
    assert res.diagnostics["solver"] == "eigh" and "residual" in res.diagnostics["fallback"]
    tried = res.diagnostics["lobpcg"]["residual"]
    assert default_tol(omega.dtype) < tried <= 3 * default_tol(omega.dtype), tried


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
