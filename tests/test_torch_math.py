"""The torch math (Fisher representations, Fisher–gradient, Ω, eigvecs) == the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_da_ref as np_ref
from lora_da_ref import principal_angles
from lora_da_ref.torch import (
    DenseFisher,
    KroneckerFisher,
    fisher_gradient,
    guidance_matrix,
    inverse_fisher_block_sum,
    smallest_eigvecs,
)
from lora_da_ref.torch.fisher import damped_cholesky, unvec, vec
from tests.report import allclose_report
from tests.torch_cases import single_thread  # noqa: F401  (autouse fixture)

# float64, well-conditioned SPD factors (cond ≲ 1e2): both sides agree to ~ cond · eps ≈ 1e-14;
# 1e-10 leaves room for the (d1·d2)-sized dense solves.
F64_RTOL = 1e-10
# Subspaces of well-separated eigenvalues (gap ≳ 1e-2 · ‖Ω‖): angle ≈ eps · ‖Ω‖ / gap.
ANGLE_TOL = 1e-8

SIZES = [(4, 3, 0), (6, 5, 1), (7, 2, 2), (5, 8, 3)]  # (d1, d2, seed)


def _spd(d: int, rng: np.random.Generator) -> np.ndarray:
    X = rng.standard_normal((d, 3 * d))
    return X @ X.T / (3 * d) + 0.5 * np.eye(d)


def _problem(d1: int, d2: int, seed: int, kind: str):
    rng = np.random.default_rng(seed)
    Z = _spd(d1, rng)
    if kind == "dense":
        J = _spd(d1 * d2, rng)
        return np_ref.DenseFisher(J, d1, d2), DenseFisher(torch.from_numpy(J), d1, d2), rng
    Y = rng.uniform(0.5, 2.0, d2) if kind == "diagonal" else _spd(d2, rng)
    return (
        np_ref.KroneckerFisher(Y, Z),
        KroneckerFisher(torch.from_numpy(Y), torch.from_numpy(Z)),
        rng,
    )


@pytest.mark.parametrize("kind", ["full", "diagonal", "dense"])
@pytest.mark.parametrize("d1,d2,seed", SIZES)
def test_fisher_math_matches_numpy(kind, d1, d2, seed):
    J_np, J_t, rng = _problem(d1, d2, seed, kind)
    G = rng.standard_normal((d1, d2))
    G_t = torch.from_numpy(G)
    allclose_report(J_t.to_dense(), J_np.to_dense(), rtol=F64_RTOL, atol=1e-14, name="to_dense")
    allclose_report(
        fisher_gradient(J_t, G_t), np_ref.fisher_gradient(J_np, G), rtol=F64_RTOL, name="ΔW"
    )
    allclose_report(
        inverse_fisher_block_sum(J_t, d1, d2),
        np_ref.inverse_fisher_block_sum(J_np, d1, d2),
        rtol=F64_RTOL,
        name="Σ J⁻¹_[i]",
    )
    delta = rng.standard_normal((d1, d2))
    for beta, alpha, n in [(1.0, 1.0, 50), (0.03, 1.0, 1000), (0.0, 1.0, 7), (1.0, 0.0, 3)]:
        omega_t = guidance_matrix(
            J_t, torch.from_numpy(delta), n, variance_weight=beta, bias_weight=alpha
        )
        omega_np = np_ref.guidance_matrix(J_np, delta, n, variance_weight=beta, bias_weight=alpha)
        allclose_report(omega_t, omega_np, rtol=F64_RTOL, atol=1e-14, name=f"Ω β={beta} α={alpha}")


def test_kronecker_equals_dense_of_its_kronecker():
    """A KroneckerFisher and the DenseFisher of Y ⊗ Z are the same matrix: same ΔW and Ω."""
    _, J_k, rng = _problem(5, 4, 7, "full")
    J_d = DenseFisher(J_k.to_dense(), 5, 4)
    G = torch.from_numpy(rng.standard_normal((5, 4)))
    allclose_report(fisher_gradient(J_d, G), fisher_gradient(J_k, G), rtol=F64_RTOL, name="ΔW")
    allclose_report(
        inverse_fisher_block_sum(J_d, 5, 4), J_k.inverse_block_sum(), rtol=F64_RTOL, name="blocks"
    )


def test_dense_fisher_solve_is_column_stacked():
    """``solve`` really inverts J on column-stacked vec: J vec(solve(G)) = vec(G)."""
    _, J_t, rng = _problem(3, 4, 11, "dense")
    G = torch.from_numpy(rng.standard_normal((3, 4)))
    allclose_report(
        J_t.to_dense() @ vec(J_t.solve(G)), vec(G), rtol=F64_RTOL, atol=1e-13, name="J·x"
    )
    assert torch.equal(unvec(vec(G), 3, 4), G)
    assert vec(G)[1] == G[1, 0] and vec(G)[3] == G[0, 1]  # column-stacking


@pytest.mark.parametrize("d1,d2,seed", SIZES)
def test_smallest_eigvecs_matches_numpy_as_subspace(d1, d2, seed):
    J_np, _, rng = _problem(d1, d2, seed, "full")
    delta = rng.standard_normal((d1, d2))
    omega = np_ref.guidance_matrix(J_np, delta, 10)
    r = max(1, d1 // 2)
    A_np = np_ref.smallest_eigvecs(omega, r)
    A_t = smallest_eigvecs(torch.from_numpy(omega), r)
    values = np.linalg.eigvalsh(omega)
    gap = values[r] - values[r - 1]
    assert gap > 1e-3 * np.abs(values).max(), "test problem must have a spectral gap"
    assert principal_angles(A_t.numpy(), A_np).max() < ANGLE_TOL
    # the deterministic sign convention is the same as the reference's
    allclose_report(A_t, A_np, rtol=1e-8, atol=1e-10, name="A with fixed signs")


def test_principal_angle_check_can_fail():
    """The subspace comparison detects a wrong answer (the r LARGEST eigenvectors)."""
    J_np, _, rng = _problem(6, 3, 5, "full")
    omega = np_ref.guidance_matrix(J_np, rng.standard_normal((6, 3)), 10)
    wrong = np.linalg.eigh(omega)[1][:, -2:]
    assert principal_angles(smallest_eigvecs(torch.from_numpy(omega), 2).numpy(), wrong).max() > 0.1


def test_damped_cholesky_raises_on_a_non_pd_matrix_as_the_numpy_reference():
    """The damping contract of both sides: M + λI not PD → ValueError naming M; never re-damped."""
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    M = v.T @ v  # rank 1, PSD, singular
    with pytest.raises(ValueError, match="Z \\+ λI is not positive definite"):
        damped_cholesky(M, 0.0, name="Z")
    with pytest.raises(ValueError, match="Z must be positive definite"):
        np_ref.KroneckerFisher(np.eye(2), M.numpy())  # the NumPy reference raises alike
    factor = damped_cholesky(M, 1e-3)
    assert factor.damping == 1e-3  # exactly the damping asked for
    allclose_report(factor.L @ factor.L.T, M + 1e-3 * torch.eye(3, dtype=M.dtype), rtol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky(-torch.eye(3, dtype=torch.float64), 1e-3)


def test_kronecker_fisher_records_damping_and_conditioning_per_factor():
    Z = torch.diag(torch.tensor([1.0, 1e-3, 1e-6], dtype=torch.float64))
    Y = torch.tensor([1.0, 0.5], dtype=torch.float64)
    J = KroneckerFisher(Y, Z, damping=1e-6, y_damping=0.25)
    assert J.damping == {"Z": 1e-6, "Y": 0.25}
    cond = J.conditioning()
    assert cond["Z"] == pytest.approx((1 + 1e-6) / 2e-6)  # κ of Z + λI, what is inverted
    assert cond["Y"] == pytest.approx(1.25 / 0.75)
    with pytest.raises(ValueError, match="diagonal Y"):
        KroneckerFisher(torch.tensor([1.0, 0.0], dtype=torch.float64), Z, damping=0.0)


def test_bad_inputs_raise():
    J = KroneckerFisher(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match=r"J is for W of shape \(3, 2\)"):
        fisher_gradient(J, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="G must have shape"):
        J.solve(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected"):
        inverse_fisher_block_sum(J, 2, 2)
    with pytest.raises(ValueError, match="n"):
        guidance_matrix(J, torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="non-finite"):
        damped_cholesky(torch.full((2, 2), float("nan")), 0.0)
    with pytest.raises(ValueError, match="square"):
        damped_cholesky(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky(-1e30 * torch.eye(2, dtype=torch.float64), 1e-6)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fisher_gradient(J, np.zeros((3, 2)))
