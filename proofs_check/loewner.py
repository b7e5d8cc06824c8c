"""Claim 3 — the Loewner bound (27)/(33)/(34) and its equality condition.

docs/equations.md: for SPD ``J`` and ``AᵀA = I``: ``(AᵀJA)⁻¹ ⪯ AᵀJ⁻¹A`` (33), hence
``tr((AᵀJA)⁻¹) ≤ tr(AᵀJ⁻¹A)`` (34). **Equality holds iff col(A) is J-invariant**, e.g. when A's
columns are eigenvectors of J, or J = cI.

Checks (J random SPD, d = 12, cond 100; A Haar-random, r = 4):
  3a  min over draws of λ_min(AᵀJ⁻¹A − (AᵀJA)⁻¹) / ‖AᵀJ⁻¹A‖ ≥ −tol;
  3b  min over draws of the relative trace gap (34) ≥ −tol;
  3c  equality: ‖AᵀJ⁻¹A − (AᵀJA)⁻¹‖ / ‖AᵀJ⁻¹A‖ at A = eigenvectors of J (rotated inside the
      subspace), and at J = cI with a random A — worst case ≤ tol;
  3d  strictness: for generic A (not J-invariant) the relative trace gap is strictly positive —
      the measured margin (min over draws) must exceed 100 × tol, and it is reported together with
      the J-invariance residual ‖(I − AAᵀ)JA‖ / ‖J‖.
Broken input: a non-orthonormal A = ½ · (orthonormal); the bound fails (AᵀJ⁻¹A shrinks by 4,
(AᵀJA)⁻¹ grows by 4).
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.linalg import random_orthonormal
from proofs_check._problems import EPS, random_spd
from proofs_check._record import ClaimResult, Mode, check_mode

REF = "Eqs. (27), (33)-(34)"
D, R, COND = 12, 4, 100.0
SETTINGS = {"quick": {"draws": 500}, "full": {"draws": 10000}}
# Inverting AᵀJA and J loses ~cond(J)·eps relatively; 100× margin for products and eigvalsh.
ROUNDOFF = 100.0 * COND * EPS
STRICT_FACTOR = 100.0  # "strictly positive": the margin must be this many round-off units


def _gap(J: np.ndarray, Jinv: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``AᵀJ⁻¹A − (AᵀJA)⁻¹`` (r, r)."""
    return A.T @ Jinv @ A - np.linalg.inv(A.T @ J @ A)


def _rel_min_eig(J, Jinv, A) -> float:
    return float(np.linalg.eigvalsh(_gap(J, Jinv, A))[0] / np.linalg.norm(A.T @ Jinv @ A, 2))


def _rel_trace_gap(J, Jinv, A) -> float:
    return float(np.trace(_gap(J, Jinv, A)) / np.trace(A.T @ Jinv @ A))


def _equality_cases(J: np.ndarray, rng: np.random.Generator) -> list[float]:
    """Relative ‖gap‖ for J-invariant col(A): eigenvectors of J (rotated), and J = cI."""
    Q = np.linalg.eigh(J)[1]
    out = []
    for cols in (np.arange(R), np.arange(D - R, D), rng.choice(D, R, replace=False)):
        A = Q[:, cols] @ random_orthonormal(R, R, rng)  # same subspace, rotated basis
        out.append(_rel_norm(J, np.linalg.inv(J), A))
    cI = 3.7 * np.eye(D)
    out.append(_rel_norm(cI, np.linalg.inv(cI), random_orthonormal(D, R, rng)))
    return out


def _rel_norm(J, Jinv, A) -> float:
    return float(np.linalg.norm(_gap(J, Jinv, A), 2) / np.linalg.norm(A.T @ Jinv @ A, 2))


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 3) -> list[ClaimResult]:
    """Claim 3: rows 3a–3d."""
    cfg = SETTINGS[check_mode(mode)]
    rng = np.random.default_rng(seed)
    J = random_spd(D, rng, COND)
    Jinv = np.linalg.inv(J)
    scale = 0.5 if broken else 1.0
    As = [scale * random_orthonormal(D, R, rng) for _ in range(cfg["draws"])]
    eig = min(_rel_min_eig(J, Jinv, A) for A in As)
    traces = [_rel_trace_gap(J, Jinv, A) for A in As]
    invariance = min(np.linalg.norm(J @ A - A @ (A.T @ J @ A)) for A in As) / np.linalg.norm(J, 2)
    equality = max(_equality_cases(J, rng))
    why = "100 × cond(J)·eps (inversion round-off)"
    n = cfg["draws"]
    return [
        ClaimResult(
            "3a",
            "Eq. (33)",
            f"min over {n} Haar A of λ_min(AᵀJ⁻¹A − (AᵀJA)⁻¹)/‖AᵀJ⁻¹A‖",
            eig,
            -ROUNDOFF,
            ">=",
            why,
        ),
        ClaimResult(
            "3b",
            "Eq. (34)",
            f"min over {n} Haar A of relative trace gap (34)",
            min(traces),
            -ROUNDOFF,
            ">=",
            why,
        ),
        ClaimResult(
            "3c",
            "Eq. (33), equality",
            "max ‖gap‖/‖AᵀJ⁻¹A‖: A = eigvecs of J, or J = cI",
            equality,
            ROUNDOFF,
            "<=",
            why,
        ),
        ClaimResult(
            "3d",
            "Eq. (33), strict",
            f"min over {n} Haar A of relative trace gap",
            min(traces),
            STRICT_FACTOR * ROUNDOFF,
            ">=",
            f"{STRICT_FACTOR:g} × round-off tol: strictly above float noise",
            details={
                "median relative trace gap (Loewner slack)": float(np.median(traces)),
                "max relative trace gap": max(traces),
                "min J-invariance residual ‖(I−AAᵀ)JA‖/‖J‖": float(invariance),
            },
        ),
    ]
