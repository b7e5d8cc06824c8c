"""The constrained MLE of Eq. (10) for the synthetic GLMs: Newton's method in ``B``.

For a fixed LoRA factor ``A`` (d1, r), the fitted weight is ``W0 + A B̂`` with
``B̂ = argmin_B L(W0 + A B)``, ``L`` the mean negative log-likelihood. With ``F0 = X W0`` and
``U = X A``, the logits are ``F0 + U B``, so the solver needs only a model's three maps of the
logits: the per-sample NLL, the output residual ``e = ∂ log p/∂f`` and the
output Fisher ``Λ = −∂² log p/∂f²``. For a canonical link the Hessian in ``B`` is
``(1/n) Σ Λ_n ⊗ u_n u_nᵀ`` exactly, so Newton converges quadratically; Armijo backtracking makes
it globally convergent wherever the minimiser exists. Where it does not (separable data,
rank-deficient ``XA``), :class:`ConvergenceError` is raised rather than a meaningless estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import linalg

from lora_da_ref.reference.linalg import kron_average, unvec, vec

__all__ = ["DEFAULT_MAX_ITER", "ConvergenceError", "newton_constrained_mle"]

# Newton stops once a full step is this small relative to ‖B‖ (+1). Newton converges quadratically,
# so the returned point is then accurate to ~STEP_RTOL²; the round-off floor of a step is
# ~eps/λ_min(H_B) (≈1e-13 for the conditioning used here), far below this.
STEP_RTOL = 1e-9
# Armijo sufficient-decrease constant (standard choice, Nocedal & Wright §3.1).
ARMIJO_C = 1e-4
# Loss differences below this many ulps of max(|L|, 1) are round-off, not increases.
LOSS_ULPS = 16
MAX_HALVINGS = 40
DEFAULT_MAX_ITER = 100


class ConvergenceError(RuntimeError):
    """The (constrained) MLE does not exist, is not unique, or Newton's method failed to reach it."""


def newton_constrained_mle(
    F0: np.ndarray,
    U: np.ndarray,
    Y: np.ndarray,
    B: np.ndarray,
    *,
    nll_terms: Callable[[np.ndarray, np.ndarray], np.ndarray],
    residuals: Callable[[np.ndarray, np.ndarray], np.ndarray],
    output_fisher: Callable[[np.ndarray], np.ndarray],
    max_iter: int = DEFAULT_MAX_ITER,
) -> np.ndarray:
    """Minimise ``L(B) = mean NLL of the logits F0 + U B`` by Newton's method with backtracking.

    Gradient ``(I⊗A)ᵀ vec G = vec(AᵀG)`` = ``−Uᵀ E / n``; Hessian ``(1/n) Σ Λ_n ⊗ u_n u_nᵀ``.

    Args:
        F0: ``X W0`` (n, d2). U: ``X A`` (n, r). Y: the n labels. B: starting point (r, d2).
        nll_terms: ``(F, Y) ↦`` per-sample ``−log p(y_n | x_n)``, (n,).
        residuals: ``(F, Y) ↦ e_n = ∂ log p(y_n | x_n)/∂f``, (n, d2).
        output_fisher: ``F ↦ Λ_n = −∂² log p/∂f²``, (n, d2, d2).
        max_iter: maximum number of Newton iterations.

    Returns:
        ``B̂`` (r, d2).

    Raises:
        ConvergenceError: the Hessian in ``B`` is singular (rank-deficient ``XA``, separable
            data), a step is not finite, the line search fails, or ``max_iter`` is reached.
    """
    n = U.shape[0]

    def loss(B: np.ndarray) -> float:
        return float(np.mean(nll_terms(F0 + U @ B, Y)))

    L = loss(B)
    for _ in range(max_iter):
        F = F0 + U @ B  # (n, d2)
        g = -U.T @ residuals(F, Y) / n  # (r, d2)
        step = _newton_step(g, output_fisher(F), U)  # (r, d2)
        if np.linalg.norm(step) <= STEP_RTOL * (1.0 + np.linalg.norm(B)):
            return B + step
        B, L = _backtrack(loss, B, L, g, step)
    raise ConvergenceError(
        f"Newton did not converge in {max_iter} iterations (‖B‖ = {np.linalg.norm(B):.3e}, "
        f"NLL = {L:.3e}); the MLE may not exist (separable or quasi-separable data)"
    )


def _newton_step(g: np.ndarray, Lam: np.ndarray, U: np.ndarray) -> np.ndarray:
    r, d2 = g.shape
    H = kron_average(Lam, U)  # (d2·r, d2·r)
    try:
        step = -unvec(linalg.cho_solve(linalg.cho_factor(H), vec(g)), r, d2)
    except linalg.LinAlgError as exc:
        raise ConvergenceError(
            "the Hessian in B is singular: XA is rank-deficient or the data are separable "
            "(the constrained MLE does not exist or is not unique)"
        ) from exc
    if not np.all(np.isfinite(step)):
        raise ConvergenceError("Newton step is not finite (Hessian numerically singular)")
    return step


def _backtrack(
    loss: Callable[[np.ndarray], float], B: np.ndarray, L: float, g: np.ndarray, step: np.ndarray
) -> tuple[np.ndarray, float]:
    slope = float(np.vdot(g, step))  # < 0 for a descent direction
    slack = LOSS_ULPS * np.finfo(np.float64).eps * max(abs(L), 1.0)
    t = 1.0
    for _ in range(MAX_HALVINGS):
        L_new = loss(B + t * step)
        if L_new <= L + ARMIJO_C * t * slope + slack:
            return B + t * step, L_new
        t *= 0.5
    raise ConvergenceError(f"backtracking line search failed (NLL = {L:.6e})")
