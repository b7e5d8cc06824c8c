"""Riemannian steepest descent on the Stiefel manifold ``{A ∈ R^{d×r}: AᵀA = I_r}``.

Used to search for an ``A`` that beats a claimed minimiser (Claim 1, Eqs. (5)–(8)) and to minimise
the un-relaxed error (Claim 13). Embedded metric: the Riemannian gradient of ``f`` at ``A`` is
``ξ = ∇f − A sym(Aᵀ∇f)``; the retraction is the sign-fixed QR factor of ``A − tξ``; the step ``t``
follows Armijo backtracking, doubling after each accepted step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.linalg import sym

ARMIJO_C = 1e-4  # sufficient-decrease constant (Nocedal & Wright §3.1)
MAX_HALVINGS = 60


@dataclass(frozen=True)
class DescentResult:
    A: np.ndarray  # (d, r) final point
    value: float  # f(A)
    grad_norm: float  # ‖Riemannian gradient‖_F at A
    iterations: int


def riemannian_gradient(A: np.ndarray, egrad: np.ndarray) -> np.ndarray:
    """Project a Euclidean gradient (d, r) onto the tangent space of the Stiefel manifold at A."""
    return egrad - A @ sym(A.T @ egrad)


def retract(A: np.ndarray, xi: np.ndarray) -> np.ndarray:
    """QR retraction ``qf(A + ξ)`` with positive diagonal of R."""
    Q, R = np.linalg.qr(A + xi)
    return Q * np.sign(np.diag(R))


def descend(
    f: Callable[[np.ndarray], float],
    egrad: Callable[[np.ndarray], np.ndarray],
    A: np.ndarray,
    *,
    max_iter: int = 500,
    gtol: float = 1e-10,
    step: float = 1.0,
) -> DescentResult:
    """Riemannian steepest descent with Armijo backtracking from ``A`` (d, r), column-orthonormal."""
    value = f(A)
    xi = riemannian_gradient(A, egrad(A))
    for it in range(max_iter):
        gnorm2 = float(np.sum(xi**2))
        if np.sqrt(gnorm2) <= gtol:
            return DescentResult(A, value, float(np.sqrt(gnorm2)), it)
        for _ in range(MAX_HALVINGS):
            A_new = retract(A, -step * xi)
            v_new = f(A_new)
            if v_new <= value - ARMIJO_C * step * gnorm2:
                break
            step *= 0.5
        else:  # no decrease at round-off level: stationary to working precision
            return DescentResult(A, value, float(np.sqrt(gnorm2)), it)
        A, value, step = A_new, v_new, 2.0 * step
        xi = riemannian_gradient(A, egrad(A))
    return DescentResult(A, value, float(np.linalg.norm(xi)), max_iter)
