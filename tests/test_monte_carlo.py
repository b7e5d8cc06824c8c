"""Monte-Carlo estimate of E‖Ŵ − W_tgt‖² (Eq. (11)): definition, Pythagoras (23), Lemma C.2."""

from __future__ import annotations

import numpy as np
import pytest

from lora_da_ref import (
    ConvergenceError,
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    monte_carlo_error,
    random_orthonormal,
    subspace_projection,
)
from tests.report import allclose_report

# Pythagoras (23) holds per replicate up to round-off of sums of O(1) squares.
PYTHAGORAS_RTOL = 1e-10
# Monte-Carlo tolerance: |mean − prediction| ≤ MC_K × standard error. The O(dim/n) finite-sample
# corrections of the MLE (≈ 0.2% for Gaussian, r=2, n=2000) are far below one SE (≈ 5%).
MC_K = 4.0

MODELS = {
    "gauss": (LinearGaussian(6, 3, pool_size=1024), 2),
    "logistic": (LogisticRegression(8, pool_size=1024), 3),
    "softmax": (SoftmaxRegression(5, 4, pool_size=1024), 2),
}
IDS = list(MODELS)


def _problem(name: str, seed: int, in_subspace: bool):
    model, r = MODELS[name]
    rng = np.random.default_rng(seed)
    W0 = model.random_weight(rng)
    A = random_orthonormal(model.d1, r, rng)
    if in_subspace:
        W_tgt = W0 + A @ (0.3 * rng.standard_normal((r, model.d2)))
    else:
        W_tgt = W0 + model.random_weight(rng, 0.3)
    return model, W0, W_tgt, A, rng


@pytest.mark.parametrize("name", IDS)
def test_replicates_follow_the_definition(name):
    """Each replicate is W0 + A·(constrained MLE on a fresh sample from p(·; W_tgt))."""
    model, W0, W_tgt, A, _ = _problem(name, 0, in_subspace=False)
    res = monte_carlo_error(model, W0, W_tgt, A, 300, 3, np.random.default_rng(42))
    rng = np.random.default_rng(42)
    for k in range(3):
        X, Y = model.sample(W_tgt, 300, rng)
        W_hat = W0 + A @ model.constrained_mle(W0, A, X, Y)
        assert np.isclose(res.errors[k], np.sum((W_hat - W_tgt) ** 2), rtol=1e-9)
    assert res.reps == 3 and res.errors.shape == (3,)
    assert res.mean == pytest.approx(np.mean(res.errors))
    assert res.std_error == pytest.approx(np.std(res.errors, ddof=1) / np.sqrt(3))


@pytest.mark.parametrize("name", IDS)
def test_pythagoras_split_is_exact_per_replicate(name):
    """Eq. (23): ‖Ŵ − W_tgt‖² = ‖Ŵ − W^P‖² + ‖W^P − W_tgt‖² for every replicate."""
    model, W0, W_tgt, A, rng = _problem(name, 1, in_subspace=False)
    res = monte_carlo_error(model, W0, W_tgt, A, 300, 10, rng)
    assert res.bias > 1e-3  # the target is outside col(A): a non-trivial split
    allclose_report(res.errors, res.errors_to_projection + res.bias, rtol=PYTHAGORAS_RTOL)
    W_P = subspace_projection(W0, W_tgt, A)
    allclose_report(W_P, W0 + A @ A.T @ (W_tgt - W0), rtol=1e-12, atol=1e-15, name="W^P")
    # The split needs the ORTHOGONAL projection: a skewed "projection" breaks it.
    skew = W_P + 0.1 * (W_tgt - W_P)
    skew_bias = np.sum((skew - W_tgt) ** 2)
    assert not np.allclose(res.errors, res.errors_to_projection + skew_bias, rtol=1e-3)


@pytest.mark.parametrize("name", IDS)
def test_variance_matches_lemma_c2_when_well_specified(name):
    """Lemma C.2 (26), matrix form (48): N·E‖Ŵ − W^P‖² → tr(((I⊗A)ᵀ J (I⊗A))⁻¹)."""
    model, W0, W_tgt, A, rng = _problem(name, 2, in_subspace=True)
    n = 2000
    res = monte_carlo_error(model, W0, W_tgt, A, n, 200, rng)
    assert res.bias < 1e-20
    IA = np.kron(np.eye(model.d2), A)  # (d1·d2, r·d2): vec(A B) = (I ⊗ A) vec(B)
    predicted = np.trace(np.linalg.inv(IA.T @ model.population_fisher(W_tgt) @ IA)) / n
    tol = MC_K * res.projection_std_error
    gap = abs(res.projection_mean - predicted)
    assert gap <= tol, f"mean={res.projection_mean:.4e} pred={predicted:.4e} tol={tol:.2e}"
    # Power: a prediction off by 2x (e.g. a lost factor) is rejected by the same tolerance.
    assert abs(res.projection_mean - 2 * predicted) > tol


def test_reproducible_with_seeded_rng():
    model, W0, W_tgt, A, _ = _problem("logistic", 3, in_subspace=False)
    a = monte_carlo_error(model, W0, W_tgt, A, 200, 4, np.random.default_rng(7))
    b = monte_carlo_error(model, W0, W_tgt, A, 200, 4, np.random.default_rng(7))
    c = monte_carlo_error(model, W0, W_tgt, A, 200, 4, np.random.default_rng(8))
    assert np.array_equal(a.errors, b.errors)
    assert not np.array_equal(a.errors, c.errors)


def test_failed_replicate_names_itself():
    model, W0, W_tgt, A, rng = _problem("logistic", 4, in_subspace=False)
    with pytest.raises(ConvergenceError, match="replicate 0"):
        monte_carlo_error(model, W0, W_tgt, A, 2, 3, rng)  # n = 2 < r = 3: no unique MLE


def test_bad_input_raises():
    model, W0, W_tgt, A, rng = _problem("softmax", 5, in_subspace=False)
    with pytest.raises(ValueError, match="reps"):
        monte_carlo_error(model, W0, W_tgt, A, 100, 1, rng)
    with pytest.raises(ValueError, match="n must be"):
        monte_carlo_error(model, W0, W_tgt, A, 0, 5, rng)
    with pytest.raises(ValueError, match="W_tgt must have shape"):
        monte_carlo_error(model, W0, W_tgt.T, A, 100, 5, rng)
    with pytest.raises(ValueError, match="A must have shape"):
        monte_carlo_error(model, W0, W_tgt, A[:-1], 100, 5, rng)
    with pytest.raises(ValueError, match="full column rank"):
        monte_carlo_error(model, W0, W_tgt, np.ones((model.d1, 2)), 100, 5, rng)
    with pytest.raises(ValueError, match="non-finite"):
        monte_carlo_error(model, W0 * np.nan, W_tgt, A, 100, 5, rng)
    with pytest.raises(TypeError, match="model"):
        monte_carlo_error("softmax", W0, W_tgt, A, 100, 5, rng)
    with pytest.raises(TypeError, match="rng"):
        monte_carlo_error(model, W0, W_tgt, A, 100, 5, 0)
