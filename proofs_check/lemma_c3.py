"""Claim 6 — Lemma C.3 (35)–(41): the inverse Fisher is Lipschitz in W.

docs/equations.md: ``‖J(W_tgt)⁻¹ − J(W0)⁻¹‖ = O(‖W_tgt − W0‖)``, via the resolvent identity (39)
``J1⁻¹ − J0⁻¹ = J1⁻¹(J0 − J1)J0⁻¹`` and the norm bound (40). What is verified numerically: the
**slope 1** of ``‖J(W0 + tD)⁻¹ − J(W0)⁻¹‖₂`` against ``‖tD‖`` on a log–log sweep.

Checks: 6a logistic, 6b softmax (exact pool Fishers): ``|slope − 1| ≤ tol``; the resolvent
identity (39) residual and the ratio of the two sides of (40) are reported.
Broken input: logistic at ``W0 = 0``. There ``σ'(f)`` is even in ``f``, so ``dJ/dW = 0`` and the
difference is O(t²) — slope 2: the O(‖ΔW‖) rate of the lemma is then an over-estimate and the
"slope ≈ 1" check fails.
"""

from __future__ import annotations

import numpy as np

from proofs_check._record import ClaimResult, Mode, check_mode
from proofs_check.models import direction, loglog_slope, make_model

REF = "Lemma C.3, (35)-(41)"
SETTINGS = {"quick": {"points": 7}, "full": {"points": 25}}
T_RANGE = (1e-4, 1e-2)  # ‖ΔW‖_F sweep; logits of W0 have s.d. ≈ 1
# Log–log slope of a t + b t² deviates from 1 by ≈ |b/a|·t ≤ t_max·O(1) = O(1e-2); tol 0.05
# allows |b/a| ≤ 5.
SLOPE_TOL = 0.05


def _sweep(name: str, points: int, broken: bool, seed: int) -> dict[str, float]:
    model = make_model(name)
    rng = np.random.default_rng(seed)
    W0, D = model.random_weight(rng), direction(model, rng)
    if broken and name == "logistic":
        W0 = np.zeros_like(W0)
    J0 = model.population_fisher(W0)
    J0inv = np.linalg.inv(J0)
    ts = np.geomspace(*T_RANGE, points)
    diffs, resolvent, ratio = [], 0.0, 0.0
    for t in ts:
        J1 = model.population_fisher(W0 + t * D)
        J1inv = np.linalg.inv(J1)
        lhs = J1inv - J0inv
        diffs.append(np.linalg.norm(lhs, 2))
        rhs = J1inv @ (J0 - J1) @ J0inv  # (39)
        resolvent = max(resolvent, np.linalg.norm(lhs - rhs, 2) / diffs[-1])
        bound = np.linalg.norm(J1inv, 2) * np.linalg.norm(J0 - J1, 2) * np.linalg.norm(J0inv, 2)
        ratio = max(ratio, diffs[-1] / bound)  # (40): must be ≤ 1
    return {
        "slope": loglog_slope(ts, np.array(diffs)),
        "resolvent": resolvent,
        "ratio": ratio,
        "constant": float(diffs[-1] / ts[-1]),
    }


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 6) -> list[ClaimResult]:
    """Claim 6: rows 6a (logistic) and 6b (softmax)."""
    cfg = SETTINGS[check_mode(mode)]
    rows = []
    for rid, name in (("6a", "logistic"), ("6b", "softmax")):
        s = _sweep(name, cfg["points"], broken, seed)
        rows.append(
            ClaimResult(
                rid,
                REF,
                f"{name}: |log–log slope of ‖J(W_tgt)⁻¹ − J(W0)⁻¹‖₂ vs ‖ΔW‖ − 1|",
                abs(s["slope"] - 1.0),
                SLOPE_TOL,
                "<=",
                f"O(t) curvature of the log–log line over ‖ΔW‖ ∈ {T_RANGE}",
                details={
                    "slope": s["slope"],
                    "(39) resolvent identity residual (rel)": s["resolvent"],
                    "(40) ‖lhs‖ / norm bound (≤ 1)": s["ratio"],
                    "‖ΔJ⁻¹‖/‖ΔW‖ at largest ‖ΔW‖": s["constant"],
                },
            )
        )
    return rows
