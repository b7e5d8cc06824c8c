"""Hypothesis property tests of the theory's linear-algebra steps (docs/theory.md's claims).

Strategies draw sizes, a condition number and a seed; the matrices are then built by seeded NumPy
generators (well-conditioned by construction), so every example is cheap and reproducible.
The CI profile (tests/conftest.py) derandomises hypothesis.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_da_ref import (
    InitProblem,
    bias_term,
    initialize,
    lora_da_init,
    principal_angles,
    random_orthonormal,
    smallest_eigenpairs,
)
from proofs_check._problems import EPS, matrix_with_singular_gap, random_spd, random_symmetric
from proofs_check._stiefel import descend

MAX_EXAMPLES = 60  # ≈ 0.03 s per example; the whole file runs in a few seconds
ANGLE_TOL = 1e-8  # Remark 4.3's subspaces: round-off ≈ eps/gap ≪ 1e-8 (proofs_check.degenerate)

seeds = st.integers(0, 2**32 - 1)


@st.composite
def spd_and_stiefel(draw):
    d = draw(st.integers(1, 12))
    r = draw(st.integers(1, d))
    cond = 10.0 ** draw(st.floats(0.0, 4.0))
    rng = np.random.default_rng(draw(seeds))
    return random_spd(d, rng, cond), random_orthonormal(d, r, rng), cond


@settings(max_examples=MAX_EXAMPLES)
@given(spd_and_stiefel())
def test_loewner_bound_holds(case):
    J, A, cond = case
    Jinv = np.linalg.inv(J)
    upper = A.T @ Jinv @ A  # (r, r)
    gap = upper - np.linalg.inv(A.T @ J @ A)
    tol = 100 * cond * EPS * np.linalg.norm(upper, 2)  # inversion round-off
    assert np.linalg.eigvalsh(gap)[0] >= -tol
    assert np.trace(gap) >= -tol * A.shape[1]


@settings(max_examples=MAX_EXAMPLES)
@given(spd_and_stiefel(), seeds)
def test_loewner_equality_iff_invariant(case, seed):
    J, A, cond = case
    d, r = A.shape
    rng = np.random.default_rng(seed)
    Jinv = np.linalg.inv(J)
    tol = 100 * cond * EPS * np.linalg.norm(Jinv, 2)
    # J-invariant subspace (eigenvectors, rotated inside the subspace): equality.
    Q = np.linalg.eigh(J)[1][:, rng.choice(d, r, replace=False)] @ random_orthonormal(r, r, rng)
    assert np.linalg.norm(Q.T @ Jinv @ Q - np.linalg.inv(Q.T @ J @ Q), 2) <= tol
    # Generic subspace: the gap is zero exactly when AᵀJA_⊥ = 0 (Schur complement identity).
    gap = A.T @ Jinv @ A - np.linalg.inv(A.T @ J @ A)
    residual = np.linalg.norm(J @ A - A @ (A.T @ J @ A), 2)  # ‖(I − AAᵀ)JA‖
    if residual <= 1e-10 * np.linalg.norm(J, 2):
        assert np.linalg.norm(gap, 2) <= tol
    elif residual >= 1e-3 * np.linalg.norm(J, 2):
        assert np.trace(gap) > tol  # strict inequality, above round-off


@settings(max_examples=MAX_EXAMPLES)
@given(st.integers(1, 10), st.integers(1, 8), seeds, st.data())
def test_degenerate_case_is_lora_one_subspace(d1, d2, seed, data):
    rng = np.random.default_rng(seed)
    G = matrix_with_singular_gap(d1, d2, rng)  # singular values k, k−1, …, 1
    r = data.draw(st.integers(1, min(d1, d2)))
    J = random_spd(d1 * d2, rng, 100.0)
    A_da, _ = lora_da_init(J, G, 100, r, delta_w=-G, variance_weight=0.0)
    A_one, _ = initialize("lora_one_subspace", InitProblem(np.zeros((d1, d2)), G, J, 100), r)
    assert principal_angles(A_da, A_one)[-1] <= ANGLE_TOL


@settings(max_examples=MAX_EXAMPLES)
@given(st.integers(1, 12), seeds, st.data(), st.booleans())
def test_courant_fischer_optimality(d, seed, data, shift):
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, d))
    omega = random_symmetric(d, rng) - (3.0 * np.eye(d) if shift else 0.0)  # indefinite or not
    lam, A_star = smallest_eigenpairs(omega, r)
    opt = float(np.trace(A_star.T @ omega @ A_star))
    tol = 100 * d * EPS * np.abs(np.linalg.eigvalsh(omega)).max()
    assert abs(opt - lam.sum()) <= tol
    draws = np.stack([random_orthonormal(d, r, rng) for _ in range(50)])
    assert np.einsum("kdr,de,ker->k", draws, omega, draws).min() >= opt - tol
    res = descend(
        lambda A: float(np.trace(A.T @ omega @ A)), lambda A: 2 * omega @ A, draws[0], max_iter=200
    )
    assert res.value >= opt - tol


@settings(max_examples=MAX_EXAMPLES)
@given(st.integers(1, 10), st.integers(1, 8), seeds, st.data())
def test_pythagoras(d1, d2, seed, data):
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, d1))
    A = random_orthonormal(d1, r, rng)
    W0, W_tgt = rng.standard_normal((d1, d2)), rng.standard_normal((d1, d2))
    W_hat = W0 + A @ rng.standard_normal((r, d2))
    delta = W_tgt - W0
    W_P = W0 + A @ (A.T @ delta)
    lhs = np.sum((W_hat - W_tgt) ** 2)
    rhs = np.sum((W_hat - W_P) ** 2) + np.sum((W_P - W_tgt) ** 2)
    tol = 100 * d1 * d2 * EPS
    assert abs(lhs - rhs) <= tol * lhs
    assert abs(bias_term(A, delta) - np.sum((W_P - W_tgt) ** 2)) <= tol * np.sum(delta**2)
