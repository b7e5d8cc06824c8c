"""The synthetic test-beds of the model-based claims, and exact population quantities.

Documented settings (all seeded): ``d1 = 8`` inputs from the Laplace design pool (4096 points,
spectrum ``k^-1``), three models —

* ``logistic``: binary logistic regression, ``d2 = 1`` (Theorem 4.1);
* ``softmax``: 4 classes, reference-class parametrisation, ``d2 = 3`` (Theorem 4.2);
* ``linear_gaussian``: ``d2 = 3`` outputs with the model's default noise covariance.

``W0`` has logits of standard deviation ≈ 1 on the pool. The *population* gradient of the target
loss at ``W0`` (data from ``W_tgt``) is exact: for these canonical-link GLMs
``G = −E_x[x (E[e | x; W_tgt] − E[e | x; W0])ᵀ]`` with the closed-form conditional mean of the
output residual ``e`` (Eq. (14)).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import expit

from lora_da_ref.reference.synthetic import (
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    SyntheticModel,
)

D1 = 8
MODEL_NAMES = ("logistic", "softmax", "linear_gaussian")
SHORT = {"logistic": "log", "softmax": "smx", "linear_gaussian": "lg"}  # row-id suffixes


def make_model(name: str) -> SyntheticModel:
    """The documented synthetic model ``name`` (see the module docstring)."""
    factories: dict[str, Callable[[], SyntheticModel]] = {
        "logistic": lambda: LogisticRegression(D1, seed=0),
        "softmax": lambda: SoftmaxRegression(D1, 4, seed=0),
        "linear_gaussian": lambda: LinearGaussian(D1, 3, seed=0),
    }
    try:
        return factories[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}") from None


def _mean_logistic(model: SyntheticModel, F: np.ndarray) -> np.ndarray:
    return expit(F)  # (n, 1): E[y | x]


def _mean_softmax(model: SyntheticModel, F: np.ndarray) -> np.ndarray:
    return model.probabilities(F)[:, : model.d2]  # (n, K−1): E[ȳ | x]


def _mean_gaussian(model: SyntheticModel, F: np.ndarray) -> np.ndarray:
    return F @ np.linalg.inv(model.noise_cov)  # (n, d2): Σ⁻¹ E[y | x]


# E[e | x; W_tgt] − E[e | x; W0] = m(F_tgt) − m(F0) with m the map below (canonical links).
MEAN_MAP: dict[type, Callable[[SyntheticModel, np.ndarray], np.ndarray]] = {
    LogisticRegression: _mean_logistic,
    SoftmaxRegression: _mean_softmax,
    LinearGaussian: _mean_gaussian,
}


def population_gradient(model: SyntheticModel, W0: np.ndarray, W_tgt: np.ndarray) -> np.ndarray:
    """Exact ``G = ∇_W E_{p(·;W_tgt)}[−log p(y|x; W)]`` at ``W0`` (Eq. (14)), shape (d1, d2)."""
    m = MEAN_MAP[type(model)]
    X = model.pool  # (M, d1)
    diff = m(model, X @ W_tgt) - m(model, X @ W0)  # (M, d2)
    return -X.T @ diff / X.shape[0]


def output_fisher_mean(model: SyntheticModel, W: np.ndarray) -> np.ndarray:
    """K-FAC's output factor ``Y = E_x E_y[e eᵀ] = E_x[Λ(x)]`` (d2, d2) at ``W`` (Algorithm 1)."""
    F = model.pool @ W  # (M, d2)
    if isinstance(model, LinearGaussian):
        return np.linalg.inv(model.noise_cov)
    if isinstance(model, LogisticRegression):
        p = expit(F)
        return np.array([[float(np.mean(p * (1 - p)))]])
    p = model.probabilities(F)[:, : model.d2]  # (M, K−1)
    return np.diag(p.mean(0)) - p.T @ p / p.shape[0]


def input_second_moment(model: SyntheticModel) -> np.ndarray:
    """K-FAC's input factor ``Z = E[x xᵀ]`` (d1, d1) over the design pool."""
    return model.pool.T @ model.pool / model.pool_size


def direction(model: SyntheticModel, rng: np.random.Generator) -> np.ndarray:
    """A random unit-Frobenius-norm direction ``D`` (d1, d2) for displacements ``W_tgt − W0``."""
    D = rng.standard_normal(model.shape)
    return D / np.linalg.norm(D)


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
