"""Claim 7 — Pythagoras (23) and the bias formula (43)–(46).

docs/equations.md: with ``W^P = W0 + AAᵀ(W_tgt − W0)`` (44), for any ``Ŵ`` in the subspace
``{W0 + AB}``: ``‖Ŵ − W_tgt‖² = ‖Ŵ − W^P‖² + ‖W^P − W_tgt‖²`` (23) — the cross term vanishes
because ``Ŵ − W^P ∈ col(A)`` and ``W^P − W_tgt ⟂ col(A)`` — and the bias is
``‖W^P − W_tgt‖² = ‖ΔW‖² − tr(AᵀΔWΔWᵀA)`` (43)–(46). Being an identity for every ``Ŵ``, (23)
also holds in expectation.

Checks (random A orthonormal, W0, W_tgt, B; several shapes):
  7a  worst relative residual of (23);
  7b  worst relative difference between ``‖W^P − W_tgt‖²`` and ``‖ΔW‖² − tr(AᵀΔWΔWᵀA)``
      (also against ``objective.bias_term``).
Broken input: a non-orthonormal A (then AAᵀ is not a projection and the cross term survives).
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.linalg import random_orthonormal
from lora_da_ref.reference.objective import bias_term
from proofs_check._problems import EPS
from proofs_check._record import ClaimResult, Mode, check_mode

SHAPES = [(8, 1, 2), (7, 5, 3), (12, 4, 1), (5, 9, 5)]  # (d1, d2, r)
SETTINGS = {"quick": {"draws": 200}, "full": {"draws": 5000}}
# Sums of d1·d2 squares: relative round-off ≲ d1·d2·eps; 100× margin.
ROUNDOFF = 100.0 * max(d1 * d2 for d1, d2, _ in SHAPES) * EPS


def _draw(rng, d1, d2, r, broken):
    A = random_orthonormal(d1, r, rng)
    if broken:
        A = A + 0.3 * rng.standard_normal((d1, r))  # not orthonormal
    W0, W_tgt = rng.standard_normal((d1, d2)), rng.standard_normal((d1, d2))
    W_hat = W0 + A @ rng.standard_normal((r, d2))  # any point of the subspace
    return A, W0, W_tgt, W_hat


def _residuals(A, W0, W_tgt, W_hat) -> tuple[float, float]:
    delta = W_tgt - W0  # (d1, d2)
    W_P = W0 + A @ (A.T @ delta)  # (44)
    lhs = np.sum((W_hat - W_tgt) ** 2)
    rhs = np.sum((W_hat - W_P) ** 2) + np.sum((W_P - W_tgt) ** 2)
    bias_direct = np.sum((W_P - W_tgt) ** 2)
    bias_formula = np.sum(delta**2) - np.trace(A.T @ delta @ delta.T @ A)  # (45)-(46)
    return abs(lhs - rhs) / lhs, abs(bias_direct - bias_formula) / np.sum(delta**2)


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 7) -> list[ClaimResult]:
    """Claim 7: rows 7a (Pythagoras) and 7b (bias formula)."""
    cfg = SETTINGS[check_mode(mode)]
    rng = np.random.default_rng(seed)
    pyth, bias, ref_gap = 0.0, 0.0, 0.0
    for d1, d2, r in SHAPES:
        for _ in range(cfg["draws"]):
            A, W0, W_tgt, W_hat = _draw(rng, d1, d2, r, broken)
            p, b = _residuals(A, W0, W_tgt, W_hat)
            pyth, bias = max(pyth, p), max(bias, b)
            if not broken:  # bias_term validates orthonormality
                delta = W_tgt - W0
                W_P = W0 + A @ (A.T @ delta)
                ref_gap = max(
                    ref_gap,
                    abs(bias_term(A, delta) - np.sum((W_P - W_tgt) ** 2)) / np.sum(delta**2),
                )
    n = cfg["draws"] * len(SHAPES)
    why = "100 × d1·d2·eps (sums of squares)"
    return [
        ClaimResult(
            "7a",
            "Eq. (23)",
            f"max rel. residual of Pythagoras over {n} draws",
            pyth,
            ROUNDOFF,
            "<=",
            why,
        ),
        ClaimResult(
            "7b",
            "Eqs. (43)-(46)",
            "max rel. |‖W^P−W_tgt‖² − (‖ΔW‖² − tr(AᵀΔWΔWᵀA))|",
            bias,
            ROUNDOFF,
            "<=",
            why,
            details={"objective.bias_term vs direct (rel)": ref_gap},
        ),
    ]
