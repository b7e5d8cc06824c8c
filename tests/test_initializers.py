"""The registry of initialisers: LoRA-DA, baselines and the Table 7 ablations."""

from __future__ import annotations

import numpy as np
import pytest

import lora_da_ref as ld
from tests.cases import CASE_IDS, CASES
from tests.independent import diagonal_problem

ANGLE_TOL = 1e-8  # rad; subspaces from two exact dense factorisations agree to ~1e-12


def _problem(case, **kw):
    J, G, _, W0 = case.problem()
    return ld.InitProblem(W0=W0, G=G, J=J, n=case.n, **kw)


@pytest.mark.parametrize("name", sorted(ld.INITIALIZERS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_initializer_returns_orthonormal_A_and_right_shapes(name, case):
    A, B = ld.initialize(name, _problem(case), case.r, np.random.default_rng(0))
    assert A.shape == (case.d1, case.r) and B.shape == (case.r, case.d2)
    np.testing.assert_allclose(A.T @ A, np.eye(case.r), atol=1e-12)


def test_baselines_pick_the_documented_subspaces():
    case = CASES[2]
    p = _problem(case)
    U_w, _, _ = np.linalg.svd(p.W0)
    U_g, _, _ = np.linalg.svd(-p.G)
    r = case.r
    pissa, _ = ld.initialize("pissa", p, r)
    milora, _ = ld.initialize("milora", p, r)
    one_subspace, B0 = ld.initialize("lora_one_subspace", p, r)
    assert ld.principal_angles(pissa, U_w[:, :r]).max() < ANGLE_TOL
    assert ld.principal_angles(milora, U_w[:, -r:]).max() < ANGLE_TOL
    assert ld.principal_angles(one_subspace, U_g[:, :r]).max() < ANGLE_TOL
    assert not B0.any()  # the subspace alone, not the official LoRA-One's B0


def test_ablations_change_only_their_term():
    case = CASES[1]
    p = _problem(case)
    dw = ld.fisher_gradient(p.J, p.G)
    r = case.r
    no_bias, _ = ld.initialize("lora_da_no_bias", p, r)
    no_var, _ = ld.initialize("lora_da_no_variance", p, r)
    no_var_fisher, B = ld.initialize("lora_da_no_variance_no_fisher", p, r)
    var_only = ld.inverse_fisher_block_sum(p.J, case.d1, case.d2)
    assert ld.principal_angles(no_bias, ld.smallest_eigvecs(var_only, r)).max() < ANGLE_TOL
    assert ld.principal_angles(no_var, np.linalg.svd(dw)[0][:, :r]).max() < ANGLE_TOL
    # Remark 4.3: without variance and Fisher, the subspace is LoRA-One's, and B0 = A0ᵀ(−G).
    one_subspace, _ = ld.initialize("lora_one_subspace", p, r)
    assert ld.principal_angles(no_var_fisher, one_subspace).max() < ANGLE_TOL
    np.testing.assert_allclose(B, no_var_fisher.T @ (-p.G), atol=1e-13)


@pytest.mark.parametrize("oracle", [False, True], ids=["fisher-gradient", "oracle-delta"])
def test_lora_da_entry_has_the_closed_form_answer(oracle):
    """The registry's "lora_da" against an answer computed without the library (diagonal J, one
    non-zero of G per column: Ω diagonal, A0 = axes of its r smallest entries). With
    ``delta_w`` given, that ΔW (here a different one, rows in other positions) must be used."""
    d1, d2, r, n = 6, 4, 2, 100
    J, G, delta, A_fisher_gradient = diagonal_problem(d1, d2, n, r)
    A_exact = A_fisher_gradient
    if oracle:
        delta = np.roll(delta, 2, axis=0) * 1.5  # disjoint row supports kept, other rows
        jmat = J.diagonal().reshape(d1, d2, order="F")
        omega = (1.0 / jmat).sum(1) / n - (delta**2).sum(1)
        A_exact = np.eye(d1)[:, np.sort(np.argsort(omega)[:r])]
        # the oracle changes the answer
        assert ld.principal_angles(A_exact, A_fisher_gradient).max() > 0.1
    problem = ld.InitProblem(np.zeros((d1, d2)), G, J, n, delta_w=delta if oracle else None)
    A, B = ld.initialize("lora_da", problem, r)
    assert ld.principal_angles(A, A_exact).max() < ANGLE_TOL
    np.testing.assert_allclose(A @ B, A_exact @ A_exact.T @ delta, atol=1e-13)


def test_lora_baseline_is_random_and_seeded():
    p = _problem(CASES[1])
    A1, B1 = ld.initialize("lora", p, 2, np.random.default_rng(1))
    A2, _ = ld.initialize("lora", p, 2, np.random.default_rng(1))
    A3, _ = ld.initialize("lora", p, 2, np.random.default_rng(2))
    np.testing.assert_array_equal(A1, A2)
    assert not np.allclose(A1, A3)
    assert not B1.any()


def test_unknown_initializer_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown initialiser 'lora-da'.*lora_da"):
        ld.initialize("lora-da", _problem(CASES[0]), 1)
