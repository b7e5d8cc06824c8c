"""Claim 8 — the matrix case (48): the variance bound as a block sum.

docs/equations.md: ``vec(Ŵ − W^P) = (I ⊗ A) vec(B̂ − B*)``, and the variance bound becomes
``(1/N) Σ_i tr(Aᵀ J⁻¹_[i] A) = tr((I⊗A)ᵀ J⁻¹ (I⊗A)) / N`` — the origin of the block sum in (19).
``J⁻¹_[i]`` is the i-th (d1, d1) diagonal block of ``J⁻¹`` (column-stacking vec).

Checks:
  8a  ``vec(AB) = (I_{d2} ⊗ A) vec(B)`` (relative error);
  8b  ``objective.variance_term`` (block sum via ``inverse_block_sum``) equals
      ``tr((I⊗A)ᵀJ⁻¹(I⊗A))/N`` from the explicit dense inverse, for a dense random SPD J and for a
      K-FAC ``J = Y ⊗ Z`` (where ``Σ_i J⁻¹_[i] = tr(Y⁻¹) Z⁻¹``).
Broken input: the Kronecker factor in the wrong order, ``A ⊗ I`` (row-stacking vec).
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.fisher import KroneckerFisher
from lora_da_ref.reference.linalg import random_orthonormal, vec
from lora_da_ref.reference.objective import variance_term
from proofs_check._problems import EPS, random_spd
from proofs_check._record import ClaimResult, Mode, check_mode

SHAPES = [(6, 4, 2), (5, 1, 3), (4, 6, 1)]  # (d1, d2, r)
COND = 1e3
N = 250
SETTINGS = {"quick": {"draws": 20}, "full": {"draws": 200}}
ROUNDOFF = 100.0 * COND * EPS  # two different inversion routes: cond(J)·eps, 100× margin


def _lift(A: np.ndarray, d2: int, broken: bool) -> np.ndarray:
    """``I_{d2} ⊗ A`` (d1·d2, r·d2); broken: ``A ⊗ I_{d2}``."""
    return np.kron(A, np.eye(d2)) if broken else np.kron(np.eye(d2), A)


def _errors(rng, d1, d2, r, broken) -> tuple[float, float]:
    A = random_orthonormal(d1, r, rng)
    B = rng.standard_normal((r, d2))
    IA = _lift(A, d2, broken)
    vec_err = np.linalg.norm(vec(A @ B) - IA @ vec(B)) / np.linalg.norm(A @ B)
    worst = 0.0
    Jk = KroneckerFisher(random_spd(d2, rng, 10.0), random_spd(d1, rng, 100.0))
    for J in (random_spd(d1 * d2, rng, COND), Jk):
        dense = J if isinstance(J, np.ndarray) else J.to_dense()
        lhs = variance_term(A, J, d2, N)
        rhs = np.trace(IA.T @ np.linalg.inv(dense) @ IA) / N
        worst = max(worst, abs(lhs - rhs) / abs(rhs))
    return float(vec_err), float(worst)


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 8) -> list[ClaimResult]:
    """Claim 8: rows 8a (vec identity) and 8b (block-sum variance = lifted trace)."""
    cfg = SETTINGS[check_mode(mode)]
    rng = np.random.default_rng(seed)
    errs = [_errors(rng, *s, broken) for s in SHAPES for _ in range(cfg["draws"])]
    why = "100 × cond(J)·eps (two inversion routes)"
    return [
        ClaimResult(
            "8a",
            "Eq. (48)",
            "max rel ‖vec(AB) − (I⊗A)vec(B)‖",
            max(e[0] for e in errs),
            ROUNDOFF,
            "<=",
            why,
        ),
        ClaimResult(
            "8b",
            "Eq. (48)",
            "max rel |Σ_i tr(AᵀJ⁻¹_[i]A) − tr((I⊗A)ᵀJ⁻¹(I⊗A))|",
            max(e[1] for e in errs),
            ROUNDOFF,
            "<=",
            why + "; dense and K-FAC J",
        ),
    ]
