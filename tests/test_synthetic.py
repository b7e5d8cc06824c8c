"""Synthetic models with exact Fisher: gradients, Fishers, (constrained) MLE, validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_da_ref import (
    ConvergenceError,
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    design_pool,
    random_orthonormal,
    vec,
)
from tests.report import allclose_report, relative_error

EPS = np.finfo(np.float64).eps
# Central differences: truncation h²·|f'''|/6 ≈ 1e-12 plus round-off eps·|f|/h ≈ 1e-10 for |f| = O(1).
FD_STEP = 1e-6
FD_ATOL = 1e-8
# Sums of O(M) terms of size O(1) in two different orders agree to ~M·eps; M ≤ 4096 here.
SUM_RTOL = 1e-11
# Monte-Carlo tolerance multiplier: error ≤ MC_K × (predicted RMS error of the mean).
MC_K = 4.0
# Stationarity of an MLE: ‖∇L‖_max at the returned point, vs. O(1) gradients elsewhere; Newton's
# last step is ≤ 1e-9 relative (quadratic convergence leaves ~1e-18) plus round-off ~1e-15.
STATIONARY_ATOL = 1e-10

SMALL_POOL = 256


def make_models(pool_size: int = SMALL_POOL, seed: int = 0):
    return {
        "gauss-5x3": LinearGaussian(5, 3, pool_size=pool_size, seed=seed),
        "logistic-6": LogisticRegression(6, pool_size=pool_size, seed=seed),
        "softmax-4xK4": SoftmaxRegression(4, 4, pool_size=pool_size, seed=seed),
    }


MODELS = make_models()
IDS = list(MODELS)


def _setup(name: str, n: int, seed: int, scale: float = 1.0):
    model = MODELS[name]
    rng = np.random.default_rng(seed)
    W = model.random_weight(rng, scale)
    X, Y = model.sample(W, n, rng)
    return model, W, X, Y, rng


def _central_difference(f, W: np.ndarray) -> np.ndarray:
    G = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        E = np.zeros_like(W)
        E[idx] = FD_STEP
        G[idx] = (f(W + E) - f(W - E)) / (2 * FD_STEP)
    return G


# ---- design pool ------------------------------------------------------------------------------
def test_pool_is_reproducible_anisotropic_and_non_gaussian():
    pool = design_pool(3, 4096, seed=7, kind="laplace", decay=1.0)
    assert np.array_equal(pool, design_pool(3, 4096, seed=7))
    assert not np.array_equal(pool, design_pool(3, 4096, seed=8))
    ev = np.linalg.eigvalsh(pool.T @ pool / len(pool))
    # Population spectrum is (1, 1/2, 1/3); the pool's is within O(1/√M) ≈ 2% of it.
    allclose_report(ev[::-1], [1, 1 / 2, 1 / 3], rtol=0.1, name="pool spectrum")
    # Any projection of a sum of 3 weighted independent Laplace variables has excess kurtosis
    # 3·Σw⁴/(Σw²)² ≥ 1; Gaussian x would give 0 (SE of the estimate ≈ 0.2 at M = 4096).
    z = (pool - pool.mean(0)) / pool.std(0)
    kurt = np.mean(z**4, axis=0) - 3.0
    assert np.all(kurt > 0.5), kurt
    z_u = design_pool(3, 4096, seed=7, kind="uniform")
    kurt_u = np.mean(((z_u - z_u.mean(0)) / z_u.std(0)) ** 4, axis=0) - 3.0
    assert np.all(kurt_u < -0.2), kurt_u  # uniform latent: platykurtic


def test_sample_draws_from_pool_and_is_seeded():
    model, _, X, Y, _ = _setup("softmax-4xK4", 50, seed=1)
    _, _, X2, Y2, _ = _setup("softmax-4xK4", 50, seed=1)
    assert np.array_equal(X, X2) and np.array_equal(Y, Y2)
    pool_rows = {tuple(row) for row in model.pool}
    assert all(tuple(row) in pool_rows for row in X)
    assert Y.shape == (50,) and set(np.unique(Y)) <= set(range(4))


# ---- gradients and Hessians ---------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_gradient_matches_central_differences(name, seed):
    model, W, X, Y, _ = _setup(name, 40, seed)
    fd = _central_difference(lambda V: model.nll(V, X, Y), W)
    allclose_report(model.gradient(W, X, Y), fd, rtol=0, atol=FD_ATOL, name="gradient vs FD")


@pytest.mark.parametrize("name", IDS)
def test_hessian_matches_differences_of_gradient(name):
    model, W, X, Y, _ = _setup(name, 40, seed=3)
    p = model.n_params
    H_fd = np.empty((p, p))
    for k in range(p):
        e = np.zeros(p)
        e[k] = FD_STEP
        dW = e.reshape(model.shape, order="F")  # unvec of a basis vector
        H_fd[:, k] = vec(model.gradient(W + dW, X, Y) - model.gradient(W - dW, X, Y)) / (
            2 * FD_STEP
        )
    allclose_report(model.hessian(W, X), H_fd, rtol=0, atol=FD_ATOL, name="Hessian vs FD")


@pytest.mark.parametrize("name", IDS)
def test_scores_average_to_minus_gradient(name):
    model, W, X, Y, _ = _setup(name, 30, seed=4)
    S = model.per_sample_scores(W, X, Y)
    assert S.shape == (30, model.n_params)
    allclose_report(S.mean(0), -vec(model.gradient(W, X, Y)), rtol=SUM_RTOL, atol=1e-15)


# ---- population Fisher -------------------------------------------------------------------------
def _conditional_fisher_loop(model, W, x):
    """E_{y|x}[s sᵀ] with s = kron(e, x), by an independent per-point computation."""
    f = W.T @ x
    if isinstance(model, LinearGaussian):
        return _gaussian_conditional_fisher(model, f, x)
    if isinstance(model, LogisticRegression):
        p1 = 1.0 / (1.0 + np.exp(-f[0]))
        outcomes = [(1 - p1, np.array([0.0 - p1])), (p1, np.array([1.0 - p1]))]
    else:
        logits = np.append(f, 0.0)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        outcomes = [
            (p[y], np.eye(model.n_classes)[y, :-1] - p[:-1]) for y in range(model.n_classes)
        ]
    return sum(w * np.outer(np.kron(e, x), np.kron(e, x)) for w, e in outcomes)


def _gaussian_conditional_fisher(model, f, x):
    """Gauss–Hermite tensor quadrature over y = f + L z: exact, s sᵀ is quadratic in z."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    weights = weights / weights.sum()
    L, P = np.linalg.cholesky(model.noise_cov), np.linalg.inv(model.noise_cov)
    out = 0.0
    for idx in itertools.product(range(3), repeat=model.d2):
        z = nodes[list(idx)]
        s = np.kron(P @ (L @ z), x)  # e = Σ⁻¹(y − f)
        out = out + np.prod(weights[list(idx)]) * np.outer(s, s)
    return out


@pytest.mark.parametrize("name", IDS)
def test_population_fisher_equals_independent_pool_loop(name):
    model = make_models(pool_size=64)[name]
    W = model.random_weight(np.random.default_rng(5), 1.5)
    J_loop = sum(_conditional_fisher_loop(model, W, x) for x in model.pool) / model.pool_size
    allclose_report(model.population_fisher(W), J_loop, rtol=SUM_RTOL, atol=1e-15, name="J")


def test_population_fisher_with_wrong_kronecker_order_differs():
    """The loop above can detect an x ⊗ e (row-stacking) ordering mistake."""
    model = make_models(pool_size=64)["softmax-4xK4"]
    W = model.random_weight(np.random.default_rng(5), 1.5)
    J = model.population_fisher(W)
    d1, d2 = model.shape
    perm = np.arange(d1 * d2).reshape(d2, d1).T.reshape(-1)  # row-stacking permutation
    assert relative_error(J[np.ix_(perm, perm)], J) > 0.1


@pytest.mark.parametrize("name", IDS)
def test_empirical_fisher_converges_to_population(name):
    """‖Ĵ_n − J‖_F ≤ MC_K·rms_n with rms_n² = (E‖s‖⁴ − ‖J‖_F²)/n, and it shrinks like 1/√n."""
    model, W = MODELS[name], MODELS[name].random_weight(np.random.default_rng(6))
    J = model.population_fisher(W)
    errs = []
    for n in (1_000, 16_000):
        X, Y = model.sample(W, n, np.random.default_rng(n))
        S = model.per_sample_scores(W, X, Y)
        rms = np.sqrt((np.mean(np.sum(S**2, 1) ** 2) - np.sum(J**2)) / n)
        err = np.linalg.norm(model.empirical_fisher(W, X, Y) - J)
        assert err <= MC_K * rms, f"n={n}: ‖Ĵ−J‖={err:.3e} > {MC_K}·rms={MC_K * rms:.3e}"
        errs.append(err)
    # √16 = 4 expected; allow a 2x fluctuation of each error.
    assert errs[1] < errs[0] / 2, errs


# ---- model-specific structure --------------------------------------------------------------------
@settings(max_examples=10)
@given(d1=st.integers(1, 6), d2=st.integers(1, 4), seed=st.integers(0, 1000))
def test_linear_gaussian_fisher_is_exactly_kronecker(d1, d2, seed):
    model = LinearGaussian(d1, d2, pool_size=64, seed=seed)
    W = model.random_weight(np.random.default_rng(seed))
    Yf, Z = model.kronecker_factors(W)
    allclose_report(Yf, np.linalg.inv(model.noise_cov), rtol=1e-12, atol=1e-14, name="Y")
    allclose_report(Z, model.pool.T @ model.pool / 64, rtol=SUM_RTOL, atol=1e-15, name="Z")
    allclose_report(model.population_fisher(W), np.kron(Yf, Z), rtol=SUM_RTOL, atol=1e-15)


def test_softmax_fisher_is_spd_and_full_parametrisation_is_singular():
    model = SoftmaxRegression(5, 4, pool_size=SMALL_POOL)
    W = model.random_weight(np.random.default_rng(8), 2.0)
    ev = np.linalg.eigvalsh(model.population_fisher(W))
    floor = model.n_params * EPS * ev[-1]  # eigvalsh round-off floor
    assert ev[0] > 1e6 * floor, f"λ_min={ev[0]:.3e}, floor={floor:.3e}"
    # All K columns free: add a zero reference column; (diag p − p pᵀ) 1 = 0 ⇒ (1_K ⊗ v) ∈ ker J.
    W_full = np.hstack([W, np.zeros((5, 1))])  # (d1, K), same probabilities
    P = model.probabilities(model.pool @ W)  # (M, K)
    Lam = P[:, :, None] * np.eye(4) - P[:, :, None] * P[:, None, :]
    J_full = sum(np.kron(Lam[m], np.outer(x, x)) for m, x in enumerate(model.pool)) / len(P)
    ev_full = np.linalg.eigvalsh(J_full)
    assert ev_full[0] < 1e2 * W_full.size * EPS * ev_full[-1]
    v = np.random.default_rng(9).standard_normal(5)
    assert np.linalg.norm(J_full @ np.kron(np.ones(4), v)) < 1e-12 * np.linalg.norm(v)


def test_logistic_equals_two_class_softmax_with_flipped_labels():
    """Softmax K=2 has p(class 0) = σ(f): the same model as logistic with y ↦ 1 − y."""
    logit, soft = LogisticRegression(4, pool_size=128), SoftmaxRegression(4, 2, pool_size=128)
    rng = np.random.default_rng(10)
    W = logit.random_weight(rng)
    X, Y = logit.sample(W, 100, rng)
    assert np.isclose(logit.nll(W, X, Y), soft.nll(W, X, 1 - Y), rtol=1e-14)
    allclose_report(logit.gradient(W, X, Y), soft.gradient(W, X, 1 - Y), rtol=1e-13, atol=1e-16)
    allclose_report(logit.population_fisher(W), soft.population_fisher(W), rtol=1e-13, atol=1e-16)


# ---- maximum likelihood --------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_mle_is_stationary(name):
    model, W, X, Y, _ = _setup(name, 500, seed=11)
    W_hat = model.mle(X, Y)
    G = model.gradient(W_hat, X, Y)
    assert np.abs(G).max() < STATIONARY_ATOL, np.abs(G).max()
    assert np.abs(model.gradient(W, X, Y)).max() > 1e3 * STATIONARY_ATOL  # W itself is not


def test_linear_gaussian_mle_is_least_squares():
    model, _, X, Y, _ = _setup("gauss-5x3", 200, seed=12)
    allclose_report(model.mle(X, Y), np.linalg.lstsq(X, Y, rcond=None)[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("r", [1, 2])
def test_constrained_mle_first_order_condition(name, r):
    model, W, X, Y, rng = _setup(name, 400, seed=13)
    W0 = W + model.random_weight(rng, 0.5)
    A = random_orthonormal(model.d1, r, rng)
    B = model.constrained_mle(W0, A, X, Y)
    assert B.shape == (r, model.d2)
    G = model.gradient(W0 + A @ B, X, Y)  # (d1, d2)
    assert np.abs(A.T @ G).max() < STATIONARY_ATOL, np.abs(A.T @ G).max()  # (r, d2) = 0
    assert np.abs(G).max() > 1e3 * STATIONARY_ATOL  # the full gradient is not zero
    # Warm start does not change the answer (the problem is strictly convex in B).
    B2 = model.constrained_mle(W0, A, X, Y, B_init=rng.standard_normal((r, model.d2)))
    allclose_report(B2, B, rtol=1e-8, atol=1e-10, name="B̂ from another start")


def test_separable_data_raise():
    logit = MODELS["logistic-6"]
    X = logit.pool[:50]
    Y = (X @ np.ones(6) > 0).astype(int)  # linearly separable
    with pytest.raises(ConvergenceError):
        logit.mle(X, Y)
    soft = MODELS["softmax-4xK4"]
    X = soft.pool[:60]
    W = np.random.default_rng(14).standard_normal((4, 3))
    Y = soft.probabilities(X @ W).argmax(1)  # labels = argmax class: separable
    with pytest.raises(ConvergenceError):
        soft.mle(X, Y)


def test_rank_deficient_design_raises():
    gauss = MODELS["gauss-5x3"]
    X = gauss.pool[:2]  # n = 2 < d1 = 5
    Y = np.zeros((2, 3))
    with pytest.raises(ConvergenceError, match="rank-deficient"):
        gauss.mle(X, Y)
    logit = MODELS["logistic-6"]
    with pytest.raises(ConvergenceError):
        logit.mle(logit.pool[:3], np.array([0, 1, 0]))


# ---- validation ------------------------------------------------------------------------------------
def test_constructor_validation():
    with pytest.raises(ValueError, match="d1"):
        LinearGaussian(0, 2)
    with pytest.raises(TypeError, match="d1"):
        LogisticRegression(2.5)
    with pytest.raises(ValueError, match="pool size"):
        LogisticRegression(10, pool_size=5)
    with pytest.raises(ValueError, match="n_classes"):
        SoftmaxRegression(3, 1)
    with pytest.raises(ValueError, match="input kind"):
        LogisticRegression(3, input_kind="gaussian")
    with pytest.raises(ValueError, match="decay"):
        LogisticRegression(3, spectrum_decay=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        LinearGaussian(3, 2, noise_cov=np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="symmetric"):
        LinearGaussian(3, 2, noise_cov=np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="noise_cov must have shape"):
        LinearGaussian(3, 2, noise_cov=np.eye(3))


@pytest.mark.parametrize("name", IDS)
def test_method_validation(name):
    model, W, X, Y, rng = _setup(name, 10, seed=15)
    with pytest.raises(ValueError, match="W must have shape"):
        model.gradient(W.T if model.d2 > 1 else W[:-1], X, Y)
    W_nan = W.copy()
    W_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.nll(W_nan, X, Y)
    with pytest.raises(ValueError, match="X must have shape"):
        model.empirical_fisher(W, X[:, :-1], Y)
    with pytest.raises(ValueError, match="Y"):
        model.nll(W, X, Y[:-1])
    with pytest.raises(ValueError, match="n must be"):
        model.sample(W, 0, rng)
    with pytest.raises(TypeError, match="rng"):
        model.sample(W, 5, 0)
    with pytest.raises(ValueError, match="A must have shape"):
        model.constrained_mle(W, np.ones((model.d1 + 1, 1)), X, Y)
    with pytest.raises(ValueError, match="B_init"):
        model.constrained_mle(W, np.ones((model.d1, 1)), X, Y, B_init=np.ones((2, model.d2)))


@pytest.mark.parametrize(
    ("name", "bad"), [("logistic-6", 2), ("softmax-4xK4", 4), ("softmax-4xK4", -1)]
)
def test_out_of_range_labels_raise(name, bad):
    model, W, X, Y, _ = _setup(name, 10, seed=16)
    Y = Y.copy()
    Y[0] = bad
    with pytest.raises(ValueError, match="labels must lie"):
        model.nll(W, X, Y)
    with pytest.raises(ValueError, match="integer"):
        model.nll(W, X, Y + 0.5)


def test_repr_and_shapes():
    soft = SoftmaxRegression(7, 5, pool_size=100, seed=3)
    assert soft.shape == (7, 4) and soft.n_params == 28 and soft.pool.shape == (100, 7)
    assert repr(soft).startswith("SoftmaxRegression(d1=7, d2=4, n_classes=5, seed=3, pool_size=100")
    assert repr(LogisticRegression(3, pool_size=10)).startswith("LogisticRegression(d1=3, seed=0")
    assert not soft.pool.flags.writeable
