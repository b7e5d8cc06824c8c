"""Claim 9 — the Fisher–gradient displacement estimate, Eqs. (14)–(16) and (21).

docs/equations.md: a second-order expansion of the mean target loss around ``W0`` (14), zero
gradient at the optimum (15), and the Hessian replaced by the Fisher (16), give
``vec(W_tgt − W0) ≈ −J(W0)⁻¹ vec(G)`` (21).

Checks:
  9a  linear-Gaussian, on a finite sample: the loss is quadratic, so ``−J⁻¹G`` with the sample's
      Fisher (= Hessian, ``Σ⁻¹ ⊗ XᵀX/n``) equals the step to the sample MLE ``Ŵ − W0`` exactly
      (round-off); with population J and G it equals ``W_tgt − W0`` exactly (reported).
  9b  logistic and 9c softmax (population G and J, exact): the error ``‖−J⁻¹G − ΔW‖`` is
      O(‖ΔW‖²): the log–log slope against ``‖ΔW‖`` is 2.
Broken input: the plain gradient ``ΔW ≈ −G`` (no Fisher), whose error is O(‖ΔW‖) (slope 1) and,
on the finite sample, far from the MLE step.
"""

from __future__ import annotations

import numpy as np

from lora_da_ref.reference.guidance import fisher_gradient
from proofs_check._problems import EPS
from proofs_check._record import ClaimResult, Mode, check_mode
from proofs_check.models import direction, loglog_slope, make_model, population_gradient

SETTINGS = {"quick": {"points": 7}, "full": {"points": 25}}
T_RANGE = (1e-3, 3e-2)  # ‖ΔW‖_F sweep (logits of W0 have s.d. ≈ 1)
# Slope of a + b t + c t² in log–log deviates from the leading power by ≈ |c/b|·t ≲ t_max·O(1)
# for O(1) logits; 0.1 allows |c/b| up to ≈ 3 at t_max = 3e-2.
SLOPE_TOL = 0.1
N_SAMPLE = 200
ROUNDOFF = 1e4 * EPS  # cond(XᵀX/n) ≈ 10–100 for this pool; 100× margin


def _estimate(J: np.ndarray, G: np.ndarray, broken: bool) -> np.ndarray:
    return -G if broken else fisher_gradient(J, G)


def _exact_case(broken: bool, seed: int) -> tuple[float, float]:
    model = make_model("linear_gaussian")
    rng = np.random.default_rng(seed)
    W0 = model.random_weight(rng)
    W_tgt = W0 + 0.3 * direction(model, rng)
    X, Y = model.sample(W_tgt, N_SAMPLE, rng)
    step = _estimate(model.hessian(W0, X), model.gradient(W0, X, Y), broken)
    mle_step = model.mle(X, Y) - W0
    sample_err = np.linalg.norm(step - mle_step) / np.linalg.norm(mle_step)
    pop = _estimate(model.population_fisher(W0), population_gradient(model, W0, W_tgt), broken)
    pop_err = np.linalg.norm(pop - (W_tgt - W0)) / np.linalg.norm(W_tgt - W0)
    return float(sample_err), float(pop_err)


def _slope(name: str, points: int, broken: bool, seed: int) -> tuple[float, float]:
    model = make_model(name)
    rng = np.random.default_rng(seed)
    W0, D = model.random_weight(rng), direction(model, rng)
    J = model.population_fisher(W0)
    ts = np.geomspace(*T_RANGE, points)
    errs = [
        np.linalg.norm(_estimate(J, population_gradient(model, W0, W0 + t * D), broken) - t * D)
        for t in ts
    ]
    return loglog_slope(ts, np.array(errs)), float(errs[-1] / ts[-1])


def run(mode: Mode = "quick", *, broken: bool = False, seed: int = 9) -> list[ClaimResult]:
    """Claim 9: rows 9a (exact, linear-Gaussian), 9b (logistic slope), 9c (softmax slope)."""
    cfg = SETTINGS[check_mode(mode)]
    sample_err, pop_err = _exact_case(broken, seed)
    rows = [
        ClaimResult(
            "9a",
            "Eqs. (14)-(16)",
            "linear-Gaussian rel ‖−J⁻¹G − (Ŵ_MLE − W0)‖, sample",
            sample_err,
            ROUNDOFF,
            "<=",
            "1e4·eps: cond(XᵀX/n)·eps with margin",
            details={"population: rel ‖−J⁻¹G − ΔW‖": pop_err},
        ),
    ]
    for rid, name in (("9b", "logistic"), ("9c", "softmax")):
        slope, rel = _slope(name, cfg["points"], broken, seed)
        rows.append(
            ClaimResult(
                rid,
                "Eqs. (16), (21)",
                f"{name}: |log–log slope of ‖−J⁻¹G − ΔW‖ vs ‖ΔW‖ − 2|",
                abs(slope - 2.0),
                SLOPE_TOL,
                "<=",
                f"O(t) curvature of the log–log line over ‖ΔW‖ ∈ {T_RANGE}",
                details={"slope": slope, "rel error at largest ‖ΔW‖": rel},
            )
        )
    return rows
