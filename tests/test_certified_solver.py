"""The certified eigensolver (``solver="certified"``, :func:`lora_da_ref.torch.solvers.certified_solver`).

Every test compares subspaces (principal angles to dense ``eigh``'s r-dimensional eigenspace), never
raw vectors, and says which broken implementation it catches. The certificate is the Davis–Kahan
bound ``sin θ_max ≤ ‖ΩV − VΘ‖₂ / δ`` with the safe gap ``δ = θ_{r+1} − ρ_{r+1} − θ_r``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_da_ref import principal_angles
from lora_da_ref.torch.solvers import (
    CERTIFIED_BUDGET,
    CERTIFIED_TOL_ANGLE,
    block_lobpcg,
    matvec_rounding,
    random_start,
    smallest_eigenpairs,
    subspace_certificate,
)
from tests.test_torch_solvers import indefinite_omega, spectrum_omega
from tests.torch_cases import single_thread  # noqa: F401  (autouse fixture)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "eigensolver_study.py"
_SPEC = importlib.util.spec_from_file_location("eigensolver_study", _PATH)
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

R = study.RANK  # 8, the official rank
TOL = CERTIFIED_TOL_ANGLE
GENEROUS = 100_000  # a matvec budget that never binds on these sizes: the certificate decides
EIGH_ERROR = 1e-10  # eigh's own subspace error (≈ u‖Ω‖/gap ≤ 1e-12 here), allowed in comparisons


def _angle(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(principal_angles(A.double().numpy(), B.double().numpy()).max())


def _eigh_space(omega: torch.Tensor, r: int = R) -> torch.Tensor:
    return smallest_eigenpairs(omega, r, solver="eigh").vectors


def _fresh_certificate(omega: torch.Tensor, X: torch.Tensor, r: int = R) -> dict:
    """The certificate of the rows ``X`` from scratch: orthonormalise, Ω·X afresh, Rayleigh–Ritz."""
    X = torch.linalg.qr(X.mT)[0].mT
    AX = X @ omega
    H = AX @ X.mT
    theta, C = torch.linalg.eigh(0.5 * (H + H.mT))
    X, AX = C.mT @ X, C.mT @ AX
    cert = subspace_certificate(theta, X, AX, r, matvec_rounding(omega))
    return cert | {"X": X, "theta": theta}


def _check_claims(omega: torch.Tensor, exact: torch.Tensor, max_iterations: list[int]) -> int:
    """After each count of iterations: a certifiable certificate is never below the true angle.
    Returns how many were certifiable (the check must not be vacuous)."""
    checked = 0
    for k in max_iterations:
        run = block_lobpcg(omega, R, seed=0, tol_angle=1e-300, max_iterations=k)
        cert = _fresh_certificate(omega, run.X)
        true = _angle(cert["X"][:R].mT, exact)
        if cert["certifiable"]:
            checked += 1
            assert true <= cert["certificate_rad"] + EIGH_ERROR, (k, true, cert)
    return checked


@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-3])
def test_certificate_never_claims_less_than_the_true_angle(gap):
    """The study's synthetic Ω (d = 384): the solver's certificate, and the certificate of the
    iterate after 1…64 iterations, are ≥ the true largest angle to eigh's subspace.
    Catches (checked by mutation): a bound 4× too optimistic, a residual taken from one column
    instead of the block's 2-norm."""
    omega, _ = study.synthetic_omega(384, gap)
    exact = _eigh_space(omega)
    res = smallest_eigenpairs(omega, R, solver="certified", max_matvecs=GENEROUS)
    d = res.diagnostics
    assert d["solver"] == "certified" and d["certified"] and d["fallback"] is None, d
    assert _angle(res.vectors, exact) <= d["certificate_rad"] + EIGH_ERROR
    assert d["certificate_rad"] <= TOL
    assert _check_claims(omega, exact, [1, 2, 4, 8, 16, 32, 64]) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-3])
def test_certificate_never_claims_less_than_the_true_angle_at_4096(gap):
    """As above at d = 4096 (the study's largest size; about 20 s per gap on a loaded 2-core
    machine, most of it building Ω and eigh)."""
    omega, _ = study.synthetic_omega(4096, gap)
    exact = _eigh_space(omega)
    res = smallest_eigenpairs(omega, R, solver="certified", max_matvecs=GENEROUS)
    d = res.diagnostics
    assert d["certified"] and d["fallback"] is None, d
    assert _angle(res.vectors, exact) <= d["certificate_rad"] + EIGH_ERROR
    assert d["certificate_rad"] <= TOL


def test_early_stop_is_caught_and_falls_back():
    """Two iterations (the official code stops after 10, unchecked) cannot be certified on the
    study's Ω (d = 256, gap 1e-2): the solver says so and returns eigh's result.
    Catches: a solver that returns its iterate when the budget runs out."""
    omega, _ = study.synthetic_omega(256, 1e-2)
    res = smallest_eigenpairs(omega, R, solver="certified", max_iterations=2, max_matvecs=GENEROUS)
    d = res.diagnostics
    assert d["solver"] == "eigh" and d["certified"] is False
    assert "not certified within 2 iterations" in d["fallback"]
    assert d["iterations"] == 2 and d["certificate_rad"] > TOL
    assert d["certified_attempt"]["certificate_rad"] == d["certificate_rad"]
    eigh = smallest_eigenpairs(omega, R, solver="eigh")
    assert torch.equal(res.vectors, eigh.vectors) and torch.equal(res.eigenvalues, eigh.eigenvalues)
    # the iterate itself is far off: what the fallback avoided
    run = block_lobpcg(omega, R, seed=0, tol_angle=1e-300, max_iterations=2)
    assert _angle(run.X[:R].mT, eigh.vectors) > TOL


def _constructed_ritz_pairs(phi: float, dpsi: float):
    """Ritz pairs of Ω (d = 40, r = 4) on a constructed search space where the naive gap lies.

    λ = −1, −0.9, −0.8, −0.5 (λ_r), −0.49 (λ_{r+1}: true gap 0.01), 0.51, then [0.6, 1]. Search
    space span{u1, u2, u3, x, y}: x = cos φ·u4 + sin φ·u5 (the r-th vector tilted by φ towards
    u5) and y = cos ψ·u5 + sin ψ·u6 with ψ = π/4 − dpsi (an unconverged guard vector). The
    (r+1)-th Ritz value is ≈ (λ5 + λ6)/2 ≈ 0.01: the naive gap θ_{r+1} − θ_r ≈ 0.51 is 50× the
    true one, while θ_{r+1} − ρ_{r+1} ≈ λ5 − 2·dpsi·(λ6 − λ5) stays below λ_{r+1}."""
    d = 40
    Q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)).double())[0]
    lam = torch.cat(
        [torch.tensor([-1.0, -0.9, -0.8, -0.5, -0.49, 0.51]), torch.linspace(0.6, 1, 34)]
    )
    omega = (Q * lam.double()) @ Q.mT
    omega = 0.5 * (omega + omega.mT)
    psi = math.pi / 4 - dpsi
    x = math.cos(phi) * Q[:, 3] + math.sin(phi) * Q[:, 4]
    y = math.cos(psi) * Q[:, 4] + math.sin(psi) * Q[:, 5]
    S = torch.linalg.qr(torch.stack([Q[:, 0], Q[:, 1], Q[:, 2], x, y], 1))[0]
    return omega, S.mT, Q[:, :4]


def test_naive_gap_claims_too_little_on_a_constructed_case():
    """The gap must be θ_{r+1} − ρ_{r+1} − θ_r, not the Ritz gap θ_{r+1} − θ_r: on the
    constructed Ritz pairs (true angle ≈ 0.0099 rad) the naive certificate claims 2.8e-4 rad —
    it would certify 1e-3 — while the corrected one claims ≥ the true angle.
    Catches: the naive gap (no residual correction of θ_{r+1})."""
    omega, X, exact = _constructed_ritz_pairs(phi=0.01, dpsi=0.003)
    cert = _fresh_certificate(omega, X, r=4)
    true = _angle(cert["X"][:4].mT, exact)
    naive = math.asin(min(1.0, cert["residual_norm"] / cert["gap"]))
    assert naive < TOL < true, (naive, true)  # the naive bound would certify a wrong subspace
    assert cert["certifiable"] and true <= cert["certificate_rad"], (true, cert)
    assert cert["gap"] > 40 * cert["certificate_gap"] > 0  # the Ritz gap overstates ≈ 50×


@pytest.mark.parametrize("split", [0.0, 1e-12])
def test_cluster_straddling_r_is_never_certified(split):
    """λ_r = λ_{r+1} − split (split 0 or 1e-12): the r-dimensional space is not determined at
    float64 precision, so the solver iterates to its budget and falls back to eigh.
    Catches: a residual-only stopping rule — ``lobpcg``'s own check (residual ≤ tol·‖Ω‖_F)
    accepts this Ω, shown below — and a solver that stops on a small residual without a gap."""
    lam = np.concatenate([np.linspace(-1, -0.5, R), [-0.5 + split], np.linspace(-0.4, 1, 191)])
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    omega = torch.from_numpy((Q * lam) @ Q.T)
    omega = 0.5 * (omega + omega.mT)
    res = smallest_eigenpairs(omega, R, solver="certified", max_matvecs=6000)
    d = res.diagnostics
    assert d["solver"] == "eigh" and d["certified"] is False and d["fallback"], d
    assert d["matvecs"] > 6000 - 2 * (R + 8)  # it kept iterating: the budget ended it
    assert smallest_eigenpairs(omega, R, solver="lobpcg").diagnostics["fallback"] is None
    # the exact eigenpairs themselves are not certifiable: the intervals overlap
    values, vectors = torch.linalg.eigh(omega)
    X = vectors[:, : R + 1].mT.contiguous()
    cert = subspace_certificate(values[: R + 1], X, X @ omega, R, matvec_rounding(omega))
    assert not cert["certifiable"] or cert["certificate_rad"] > TOL, cert
    if split == 0.0:
        assert not cert["certifiable"] and "overlap" in cert["reason"]


@pytest.mark.parametrize(
    "case",
    ["indefinite-f64", "indefinite-f32", "outliers", "well-separated-r1"],
)
def test_agrees_with_eigh_as_subspaces(case):
    """Certified results on other spectra (Ω = βZ⁻¹ − ΔΔᵀ-like, float32 and float64; outliers then
    a bulk; r = 1) agree with eigh as subspaces: angle ≤ certificate ≤ tol, eigenvalues within
    the residual bound, orthonormal columns, ascending, sign convention — never as raw vectors.
    Catches: returning unsorted or non-orthonormal Ritz vectors, eigenvalues that are not the
    returned vectors' Ritz values, a dtype other than Ω's."""
    r = 1 if case == "well-separated-r1" else 6
    if case.startswith("indefinite"):
        omega = indefinite_omega(300, 4, torch.float32 if case.endswith("f32") else torch.float64)
    elif case == "outliers":
        omega, _ = spectrum_omega(300, r, (-1.0, -0.6), (-0.55, 0.2), seed=2)
    else:
        omega, _ = spectrum_omega(300, r, (-1.0, -1.0), (0.0, 1.0), seed=5)
    res = smallest_eigenpairs(omega, r, solver="certified", seed=7, max_matvecs=GENEROUS)
    d = res.diagnostics
    assert d["certified"] and d["fallback"] is None, d
    assert res.vectors.dtype == omega.dtype and res.eigenvalues.dtype == omega.dtype
    eigh = smallest_eigenpairs(omega.double(), r, solver="eigh")
    assert _angle(res.vectors, eigh.vectors) <= d["certificate_rad"] <= TOL
    V = res.vectors.double()
    assert torch.allclose(V.mT @ V, torch.eye(r, dtype=torch.float64), atol=1e-6)
    assert bool((res.eigenvalues[1:] >= res.eigenvalues[:-1]).all())
    idx = res.vectors.abs().argmax(dim=0)
    assert bool((res.vectors[idx, torch.arange(r)] > 0).all())
    # each Ritz value is within its residual norm (+ float32 rounding) of an eigenvalue
    scale = float(torch.linalg.matrix_norm(omega.double(), 2))
    slack = d["certificate_residual"] + (1e-6 * scale if omega.dtype == torch.float32 else 0.0)
    assert torch.allclose(res.eigenvalues.double(), eigh.eigenvalues, rtol=0, atol=slack)


def test_deterministic_for_a_seed():
    """Same Ω and seed → bit-identical result; another seed → the same subspace (within the
    certificates). Catches: a solver drawing from the global RNG."""
    omega = indefinite_omega(256, 1)
    a = smallest_eigenpairs(omega, 4, solver="certified", seed=3, max_matvecs=GENEROUS)
    torch.manual_seed(123)
    b = smallest_eigenpairs(omega, 4, solver="certified", seed=3, max_matvecs=GENEROUS)
    c = smallest_eigenpairs(omega, 4, solver="certified", seed=4, max_matvecs=GENEROUS)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.eigenvalues, b.eigenvalues)
    bound = a.diagnostics["certificate_rad"] + c.diagnostics["certificate_rad"]
    assert _angle(a.vectors, c.vectors) <= bound


def test_diagnostics_keep_the_pipeline_keys():
    """The keys the pipeline, ``precision_bound`` and the reports read (``gap``, ``residual``,
    ``iterations``, ``fallback``, ``shift``) and the certificate's own, on both paths; ``gap`` is
    the Ritz estimate of eigh's λ_{r+1} − λ_r. Catches: a renamed or missing key (precision_bound
    returns None without ``gap``; the report prints ``fallback``)."""
    omega = indefinite_omega(300, 2)
    eigh = smallest_eigenpairs(omega, 5, solver="eigh").diagnostics
    res = smallest_eigenpairs(omega, 5, solver="certified", max_matvecs=GENEROUS).diagnostics
    fell = smallest_eigenpairs(omega, 5, solver="certified", max_iterations=1, max_matvecs=GENEROUS)
    for d in (res, fell.diagnostics):
        for key in ("solver", "iterations", "residual", "fallback", "shift", "gap"):
            assert key in d, key
        for key in ("certified", "certificate_rad", "matvecs", "certificate_gap", "tol_angle"):
            assert key in d, key
    assert res["solver"] == "certified" and res["fallback"] is None and res["residual"] < 1e-5
    assert res["gap"] == pytest.approx(eigh["gap"], rel=1e-3)
    assert 0 < res["certificate_gap"] <= res["gap"]
    assert res["matvecs"] >= (res["iterations"] + 1) * res["guard"]
    assert fell.diagnostics["solver"] == "eigh" and fell.diagnostics["gap"] == eigh["gap"]


def test_budget_is_a_fraction_of_eigh_flops():
    """Default budget: ⌈0.2·(2/3)·d⌉ matvecs (eigh's (4/3)d³ flops in units of 2d²), never
    exceeded; when it cannot pay for the start and 8 iterations the solver goes straight to
    eigh. Catches: an unbounded iteration (the fallback must cap the cost at
    (1 + budget)·eigh)."""
    omega, _ = study.synthetic_omega(1200, 1e-3)  # needs ~1000 matvecs: more than the budget
    res = smallest_eigenpairs(omega, R, solver="certified")
    d = res.diagnostics
    limit = math.ceil(CERTIFIED_BUDGET * 2 * 1200 / 3)
    assert d["certified_attempt"]["max_matvecs"] == limit
    assert d["solver"] == "eigh" and "matvecs" in d["fallback"]
    assert 0 < d["matvecs"] <= limit
    small = smallest_eigenpairs(indefinite_omega(120, 0), 4, solver="certified").diagnostics
    assert small["solver"] == "eigh" and small["matvecs"] == 0 and "cheaper" in small["fallback"]
    tiny = smallest_eigenpairs(indefinite_omega(30, 0), 4, solver="certified").diagnostics
    assert "does not fit" in tiny["fallback"]


def _missed_eigenvector_omega(d: int = 300, r: int = 4, guard: int = 8, seed: int = 5):
    """Ω whose smallest eigenvector u1 (λ = −2) is exactly orthogonal to the solver's seeded start
    block: every iterate stays in the invariant subspace u1^⊥, and u1 is never seen."""
    X0 = random_start(d, r + guard, seed, torch.zeros(1, dtype=torch.float64)).numpy()
    rng = np.random.default_rng(1)
    z = rng.standard_normal(d)
    for _ in range(2):
        z -= X0 @ (X0.T @ z)
    Q = np.linalg.qr(np.column_stack([z / np.linalg.norm(z), rng.standard_normal((d, d - 1))]))[0]
    lam = np.concatenate([[-2.0], np.linspace(-1, -0.5, r), np.linspace(0, 1, d - r - 1)])
    omega = torch.from_numpy((Q * lam) @ Q.T)
    return 0.5 * (omega + omega.mT), torch.from_numpy(Q[:, :r].copy())


def test_missed_eigenvalue_needs_the_inertia_test():
    """Assumption (A) of the certificate, shown: with a start orthogonal to the smallest
    eigenvector the iteration certifies the wrong subspace (angle π/2); ``verify_inertia=True``
    detects the missed eigenvalue (Cholesky of Ω + cVVᵀ − σI fails) and falls back to eigh.
    Catches: an inertia test that cannot fail, and documents what the residual certificate
    alone cannot exclude."""
    omega, exact = _missed_eigenvector_omega()
    options = {"seed": 5, "guard": 8, "max_matvecs": GENEROUS}
    plain = smallest_eigenpairs(omega, 4, solver="certified", **options)
    assert plain.diagnostics["certified"] and _angle(plain.vectors, exact) > 1.5
    checked = smallest_eigenpairs(omega, 4, solver="certified", verify_inertia=True, **options)
    d = checked.diagnostics
    assert d["solver"] == "eigh" and d["certified_attempt"]["inertia_verified"] is False
    assert "inertia" in d["fallback"] and _angle(checked.vectors, exact) <= 1e-8


def test_inertia_test_passes_on_a_correct_result():
    """On a correctly converged run the inertia test succeeds, and its rounding margin τ only
    lowers the gap slightly. Catches: an inertia test that always fails (every verified solve
    would silently become eigh)."""
    omega = indefinite_omega(300, 6)
    plain = smallest_eigenpairs(omega, 5, solver="certified", max_matvecs=GENEROUS).diagnostics
    res = smallest_eigenpairs(
        omega, 5, solver="certified", max_matvecs=GENEROUS, verify_inertia=True
    )
    d = res.diagnostics
    assert d["certified"] and d["inertia_verified"] is True, d
    assert 0 < d["inertia_margin"] < 1e-6 * d["certificate_gap"]
    assert plain["certificate_rad"] <= d["certificate_rad"] <= TOL
    assert _angle(res.vectors, _eigh_space(omega, 5)) <= d["certificate_rad"]


def test_bad_options_raise():
    omega = indefinite_omega(100, 0)
    with pytest.raises(ValueError, match="guard"):
        smallest_eigenpairs(omega, 2, solver="certified", guard=0)
    with pytest.raises(ValueError, match="tol_angle"):
        smallest_eigenpairs(omega, 2, solver="certified", tol_angle=0.0)
    with pytest.raises(TypeError):
        smallest_eigenpairs(omega, 2, solver="certified", niter=10)  # a LOBPCG option


def test_auto_solver_picks_eigh_below_the_crossover_and_certified_from_it(monkeypatch):
    """``solver="auto"`` (the default) is eigh, bit for bit, below ``AUTO_CERTIFIED_MIN_DIM`` and
    the certified solver from it (the crossover lowered to 256 so the test stays small).
    Catches: an ``auto`` that always takes one of the two, or a threshold off by one."""
    from lora_da_ref.torch import solvers

    monkeypatch.setattr(solvers, "AUTO_CERTIFIED_MIN_DIM", 256)
    small, _ = study.synthetic_omega(255, 1e-1)
    res = smallest_eigenpairs(small, R, solver="auto", seed=0)
    eigh = smallest_eigenpairs(small, R, solver="eigh")
    assert torch.equal(res.vectors, eigh.vectors) and res.diagnostics["solver"] == "eigh"
    assert res.diagnostics["auto"].startswith("eigh")
    large, _ = study.synthetic_omega(256, 1e-1)
    res = smallest_eigenpairs(large, R, solver="auto", seed=0, max_matvecs=GENEROUS)
    assert res.diagnostics["auto"].startswith("certified") and res.diagnostics["certified"]
    assert _angle(res.vectors, _eigh_space(large)) <= TOL


def test_default_solver_is_auto():
    """The user-facing configs default to ``"auto"``; the official preset keeps its LOBPCG."""
    from lora_da_ref.torch import LoraDAConfig, SolveConfig

    assert LoraDAConfig().solver == SolveConfig().solver == "auto"
    assert LoraDAConfig.preset("official").solver == "lobpcg"
