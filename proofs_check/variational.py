"""Claim 2 — the variational identity (28) and its use in (29)–(31).

docs/equations.md: for SPD ``M`` and a vector ``v``, ``vᵀM⁻¹v = max_u {2uᵀv − uᵀMu}``, attained at
``u = M⁻¹v`` (28). The Loewner proof applies it in the full space with ``M = J`` and ``v = Aw``
(29), restricts ``u`` to ``col(A)``, ``u = Az`` (30) — which cannot increase the maximum — and
applies (28) again with ``M = AᵀJA``, ``v = w`` (31).

Checks (random SPD M, cond 1e3; random orthonormal A; random v, w):
  2a  (28) value at ``u* = M⁻¹v`` equals ``vᵀM⁻¹v`` (relative error, round-off level);
  2b  (28) maximality: no random ``u`` (perturbations of ``u*`` at several scales) exceeds it;
      also ``φ(u*+δ) = φ(u*) − δᵀMδ`` exactly (completing the square, reported);
  2c  (30)–(31): the objective at ``u = Az`` equals ``2zᵀw − zᵀ(AᵀMA)z`` and its maximum
      ``wᵀ(AᵀMA)⁻¹w`` is ≤ the full-space maximum ``(Aw)ᵀM⁻¹(Aw)`` (29): min gap ≥ −tol.
Broken input: an indefinite ``M`` (largest eigenvalue sign-flipped): the stationary point is a
saddle, the supremum is +∞ and 2b fails.
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.linalg import random_orthonormal, sym
from proofs_check._problems import EPS, random_spd
from proofs_check._record import ClaimResult, Mode, check_mode

REF = "Eqs. (28)-(31)"
D, R, COND = 10, 4, 1e3
SETTINGS = {"quick": {"draws": 2000, "trials": 20}, "full": {"draws": 20000, "trials": 200}}
# Solving with an SPD matrix loses ~cond(M)·eps relatively; 100× margin for sums/products.
ROUNDOFF = 100.0 * COND * EPS


def phi(u: np.ndarray, v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The objective ``2uᵀv − uᵀMu`` of (28); ``u`` may be a batch (k, d)."""
    return 2.0 * u @ v - np.einsum("ki,ij,kj->k", np.atleast_2d(u), M, np.atleast_2d(u))


def _matrix(rng: np.random.Generator, broken: bool) -> np.ndarray:
    M = random_spd(D, rng, COND)
    if broken:
        lam, Q = np.linalg.eigh(M)
        lam[-1] = -lam[-1]  # flip the largest: random directions then see δᵀMδ < 0 often
        M = sym((Q * lam) @ Q.T)
    return M


def _trial(rng: np.random.Generator, draws: int, broken: bool) -> dict[str, float]:
    M, v = _matrix(rng, broken), rng.standard_normal(D)
    u_star = np.linalg.solve(M, v)  # (D,)
    value = float(v @ u_star)
    scales = np.geomspace(1e-3, 1e2, draws)[:, None] * np.linalg.norm(u_star)
    delta = rng.standard_normal((draws, D)) / np.sqrt(D) * scales  # (draws, D)
    vals = phi(u_star + delta, v, M)
    quad = np.einsum("ki,ij,kj->k", delta, M, delta)  # δᵀMδ, (draws,)
    square = np.abs(vals - (value - quad)) / (abs(value) + np.abs(quad))
    A, w = random_orthonormal(D, R, rng), rng.standard_normal(R)
    z = rng.standard_normal(R)
    AMA = A.T @ M @ A
    restricted = 2 * z @ w - z @ AMA @ z
    full_at_Az = phi(A @ z, A @ w, M)[0]
    return {
        "a": abs(phi(u_star, v, M)[0] - value) / abs(value),
        "b": float(np.max(vals) - value) / abs(value),
        "square": float(np.max(square)),
        "c_same": abs(restricted - full_at_Az) / max(abs(full_at_Az), 1.0),
        "c_gap": float((A @ w) @ np.linalg.solve(M, A @ w) - w @ np.linalg.solve(AMA, w))
        / float(w @ w),
    }


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 2) -> list[ClaimResult]:
    """Claim 2 (Eqs. 28–31): rows 2a, 2b, 2c (worst case over the trials)."""
    cfg = SETTINGS[check_mode(mode)]
    rng = np.random.default_rng(seed)
    trials = [_trial(rng, cfg["draws"], broken) for _ in range(cfg["trials"])]
    worst = {k: max(t[k] for t in trials) for k in ("a", "b", "square", "c_same")}
    c_gap = min(t["c_gap"] for t in trials)
    why = "100 × cond(M)·eps (SPD solve round-off)"
    n = cfg["trials"]
    return [
        ClaimResult(
            "2a", "Eq. (28)", "rel |φ(M⁻¹v) − vᵀM⁻¹v|, worst trial", worst["a"], ROUNDOFF, "<=", why
        ),
        ClaimResult(
            "2b",
            "Eq. (28)",
            f"max over {n}×{cfg['draws']} random u of (φ(u) − vᵀM⁻¹v)/|vᵀM⁻¹v|",
            worst["b"],
            ROUNDOFF,
            "<=",
            why,
            details={"completing-the-square residual (rel)": worst["square"]},
        ),
        ClaimResult(
            "2c",
            "Eqs. (29)-(31)",
            "min over trials of [(Aw)ᵀM⁻¹(Aw) − wᵀ(AᵀMA)⁻¹w]/‖w‖²",
            c_gap,
            -ROUNDOFF,
            ">=",
            why,
            details={"(30) restricted = full objective at u=Az (rel err)": worst["c_same"]},
        ),
    ]
