"""Claim 11 — Remark 4.3, the degenerate case: LoRA-DA without variance = LoRA-One's subspace.

docs/equations.md: drop the variance term and use ``ΔW ≈ −G``. Then ``Ω = −GGᵀ`` (22) and ``A0``
becomes the top-r left singular vectors of G — the LoRA-GA / LoRA-One subspace.

Checks (random G with singular values 1, 2, …: a non-degenerate gap; every r):
  11a ``guidance_matrix(J, −G, N, variance_weight=0)`` equals ``−U diag(σ²) Uᵀ`` built from the
      SVD ``G = U diag(σ) Vᵀ`` (22): an independent route (no product GGᵀ), relative error;
  11b largest principal angle between ``lora_da_init(…, delta_w=−G, variance_weight=0)`` and the
      ``lora_one_subspace`` initialiser's A ≤ 1e-8 rad (``ANGLE_TOL``: far above the round-off,
      far below any real difference of subspaces).
Broken input: the variance term is kept (β = 1) with a Fisher whose inverse block sum is not a
multiple of I, so the subspaces differ.
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.guidance import guidance_matrix
from lora_da_ref.reference.initializers import InitProblem, initialize, lora_da_init
from lora_da_ref.reference.linalg import principal_angles
from proofs_check._problems import EPS, matrix_with_singular_gap, random_spd
from proofs_check._record import ClaimResult, Mode, check_mode

SHAPES = [(10, 6), (8, 1), (6, 9)]  # (d1, d2)
N = 100
# Largest principal angle: eigh/SVD subspace error ≈ eps/gap ≈ 1e-15 here (unit gaps), so 1e-8
# leaves seven orders of margin for round-off and still fails any real difference of subspaces.
ANGLE_TOL = 1e-8
# Ω(β=0) is one product GGᵀ, −UΣ²Uᵀ a backward-stable SVD (error ≲ d·eps·σ₁²) and one product:
# relative round-off ≲ d·eps, 100× margin (d ≤ 10).
ROUNDOFF = 100.0 * 10 * EPS
SETTINGS = {"quick": {"draws": 5}, "full": {"draws": 100}}


def _one(rng, d1, d2, broken) -> tuple[float, float]:
    G = matrix_with_singular_gap(d1, d2, rng)  # (d1, d2)
    J = random_spd(d1 * d2, rng, 1e3)
    beta = 1.0 if broken else 0.0
    # broken: N = 1 makes the kept variance term comparable to GGᵀ (it moves Ω and the subspace)
    n = 1 if broken else N
    omega = guidance_matrix(J, -G, n, variance_weight=beta)
    U, sv, _ = np.linalg.svd(G, full_matrices=False)  # (d1, k), (k,)
    svd_route = -(U * sv**2) @ U.T  # −U diag(σ²) Uᵀ = −GGᵀ, Eq. (22)
    omega_err = np.linalg.norm(omega - svd_route) / np.linalg.norm(svd_route)
    problem = InitProblem(W0=np.zeros((d1, d2)), G=G, J=J, n=N)
    worst = 0.0
    for r in range(1, min(d1, d2) + 1):
        A_da, _ = lora_da_init(J, G, n, r, delta_w=-G, variance_weight=beta)
        A_one, _ = initialize("lora_one_subspace", problem, r)
        worst = max(worst, float(principal_angles(A_da, A_one)[-1]))
    return float(omega_err), worst


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 11) -> list[ClaimResult]:
    """Claim 11: rows 11a (Eq. 22) and 11b (subspace equivalence)."""
    cfg = SETTINGS[check_mode(mode)]
    rng = np.random.default_rng(seed)
    res = [_one(rng, d1, d2, broken) for d1, d2 in SHAPES for _ in range(cfg["draws"])]
    return [
        ClaimResult(
            "11a",
            "Eq. (22)",
            "max rel ‖Ω(β=0, ΔW=−G) − (−U diag(σ²) Uᵀ)‖, SVD of G",
            max(r[0] for r in res),
            ROUNDOFF,
            "<=",
            "100 × d·eps (one product vs a backward-stable SVD)",
        ),
        ClaimResult(
            "11b",
            "Remark 4.3",
            "max angle LoRA-DA(β=0, ΔW=−G) vs LoRA-One subspace (rad)",
            max(r[1] for r in res),
            ANGLE_TOL,
            "<=",
            "eigh/SVD subspace error ≈ eps/gap ≈ 1e-15; 1e-8 leaves a wide margin",
        ),
    ]
