"""Monte-Carlo estimate of the LoRA-FA estimation error ``E‖Ŵ − W_tgt‖_F²`` (Eq. (11)).

Each replicate draws ``N`` samples from ``p(·; W_tgt)`` of a synthetic model, fits the constrained
MLE ``Ŵ = W0 + A B̂`` with ``A`` fixed (Eq. (10)), and records

* ``‖Ŵ − W_tgt‖_F²``, the quantity the LoRA-DA objective (11) minimises in expectation;
* ``‖Ŵ − W^P‖_F²`` with ``W^P = W0 + P_A (W_tgt − W0)`` (Eq. (44)), the variance part of the
  Pythagoras split (23), which Lemma C.2 predicts to be ``≈ tr((AᵀJA)⁻¹)/N`` for ``d2 = 1``.

``P_A = A (AᵀA)⁻¹ Aᵀ`` is the orthogonal projector onto ``col(A)``; it equals ``A Aᵀ`` for the
column-orthonormal ``A`` of the analysis, and keeps (23) exact for any full-rank ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.checks import as_array, check_generator, check_positive_int
from lora_da_ref.reference.synthetic import ConvergenceError, SyntheticModel

__all__ = ["MonteCarloResult", "monte_carlo_error", "subspace_projection"]

# A is rejected as rank-deficient if its condition number exceeds 1/RANK_RTOL (the projector
# P_A and B̂ would be dominated by round-off).
RANK_RTOL = 1e-10


@dataclass(frozen=True)
class MonteCarloResult:
    """Replicates of the squared errors of Eq. (11) and their summary.

    Attributes:
        mean: sample mean of ``errors`` (estimates ``E‖Ŵ − W_tgt‖_F²``).
        std_error: standard error of ``mean`` (sample std / √reps).
        reps: number of replicates.
        errors: ``‖Ŵ − W_tgt‖_F²`` per replicate, ``(reps,)``.
        errors_to_projection: ``‖Ŵ − W^P‖_F²`` per replicate, ``(reps,)`` (Eq. (23)).
        bias: ``‖W^P − W_tgt‖_F²``, the deterministic bias term of Eq. (23).
    """

    mean: float
    std_error: float
    reps: int
    errors: np.ndarray
    errors_to_projection: np.ndarray
    bias: float

    @property
    def projection_mean(self) -> float:
        """Mean of ``‖Ŵ − W^P‖_F²`` (estimates the variance term of Eq. (23))."""
        return float(np.mean(self.errors_to_projection))

    @property
    def projection_std_error(self) -> float:
        """Standard error of :attr:`projection_mean`."""
        return _std_error(self.errors_to_projection)


def _std_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(values.size))


def subspace_projection(W0: np.ndarray, W_tgt: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``W^P = W0 + P_A (W_tgt − W0)`` (Eq. (44)), ``P_A`` the projector onto ``col(A)``.

    Args:
        W0: pre-trained weight ``W0`` (d1, d2). W_tgt: target ``W_tgt`` (d1, d2).
        A: LoRA factor ``A`` (d1, r), full column rank.
    """
    Q = _orthonormal_basis(A)  # (d1, r)
    return W0 + Q @ (Q.T @ (W_tgt - W0))  # (d1, d2)


def _orthonormal_basis(A: np.ndarray) -> np.ndarray:
    Q, R = np.linalg.qr(A)  # (d1, r), (r, r)
    diag = np.abs(np.diag(R))
    if diag.min() <= RANK_RTOL * diag.max():
        raise ValueError(f"A (shape {A.shape}) must have full column rank")
    return Q


def monte_carlo_error(
    model: SyntheticModel,
    W0: np.ndarray,
    W_tgt: np.ndarray,
    A: np.ndarray,
    n: int,
    reps: int,
    rng: np.random.Generator,
) -> MonteCarloResult:
    """Monte-Carlo estimate of ``E‖Ŵ − W_tgt‖_F²`` for LoRA-FA with fixed ``A`` (Eq. (11)).

    Each replicate: ``(X, Y) ~ p(·; W_tgt)`` with ``n`` samples (Eq. (9)); ``B̂`` = constrained MLE
    (Eq. (10)), Newton warm-started at ``B* = argmin_B ‖A B − (W_tgt − W0)‖_F``; ``Ŵ = W0 + A B̂``.

    Args:
        model: the synthetic model ``p(y | x; W)``.
        W0: pre-trained weight ``W0`` (d1, d2).
        W_tgt: target weight ``W_tgt`` (d1, d2) generating the data.
        A: fixed LoRA factor ``A`` (d1, r), full column rank.
        n: sample size ``N`` of each data set.
        reps: number of independent data sets (>= 2, for a standard error).
        rng: random generator driving all replicates.

    Raises:
        ConvergenceError: a replicate's constrained MLE does not exist (e.g. separable data).
    """
    W0, W_tgt, A, n, reps = _check_mc_args(model, W0, W_tgt, A, n, reps, rng)
    W_P = subspace_projection(W0, W_tgt, A)  # (d1, d2)
    B_star = np.linalg.lstsq(A, W_tgt - W0, rcond=None)[0]  # (r, d2)
    errors, to_proj = np.empty(reps), np.empty(reps)
    for k in range(reps):
        W_hat = W0 + A @ _fit_replicate(model, W0, W_tgt, A, n, rng, B_star, k)  # (d1, d2)
        errors[k] = np.sum((W_hat - W_tgt) ** 2)
        to_proj[k] = np.sum((W_hat - W_P) ** 2)
    bias = float(np.sum((W_P - W_tgt) ** 2))
    return MonteCarloResult(float(np.mean(errors)), _std_error(errors), reps, errors, to_proj, bias)


def _fit_replicate(model, W0, W_tgt, A, n, rng, B_star, k) -> np.ndarray:
    X, Y = model.sample(W_tgt, n, rng)
    try:
        return model.constrained_mle(W0, A, X, Y, B_init=B_star)  # (r, d2)
    except ConvergenceError as exc:
        raise ConvergenceError(f"replicate {k} (n = {n}): {exc}") from exc


def _check_mc_args(model, W0, W_tgt, A, n, reps, rng):
    if not isinstance(model, SyntheticModel):
        raise TypeError(f"model must be a SyntheticModel, got {type(model).__name__}")
    W0 = as_array("W0", W0, model.shape)
    W_tgt = as_array("W_tgt", W_tgt, model.shape)
    A = as_array("A", A, (model.d1, None))
    if not 1 <= A.shape[1] <= model.d1:
        raise ValueError(f"A must have between 1 and d1 = {model.d1} columns, got {A.shape[1]}")
    _orthonormal_basis(A)  # rank check
    check_generator(rng)
    return W0, W_tgt, A, check_positive_int("n", n), check_positive_int("reps", reps, minimum=2)
