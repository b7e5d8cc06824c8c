"""Claim 10 — Theorems 4.1 (d2 = 1) and 4.2 (general d2): A0 minimises the bound; measured error.

docs/equations.md: the optimal ``A0`` solves (5) with ``Ω = (1/N) Σ_i J(W0)⁻¹_[i] − ΔWΔWᵀ``
(13)/(19), i.e. it minimises the bound ``tr(AᵀΩA) + ‖ΔW‖²`` of the expected error (11)
``E‖Ŵ − W_tgt‖²``.

Documented settings: logistic (d2 = 1), softmax (K = 4, d2 = 3), linear-Gaussian (d2 = 3);
``d1 = 8``, ``r = 2``; ``W0`` with logits of s.d. ≈ 1; ``ΔW = C_DISP · D / √N`` (random unit D:
the standing assumption ‖ΔW‖ = O(1/√N)); exact ``J(W0)`` and population gradient ``G``.
``A0`` is the theorem's (oracle ΔW) LoRA-DA; competitors are every registered initialiser
(LoRA random, PiSSA, MiLoRA, LoRA-One, the three ablations), LoRA-DA with the Fisher–gradient
estimate ``ΔW = −J⁻¹G`` (21), and Haar-random orthonormal A.

  10a (deterministic) ``N·(bound(A) − bound(A0)) ≥ −tol`` for every competitor;
  10b (Monte-Carlo) the measured error (11) of every method on fresh data sets (constrained MLE,
      ``monte_carlo_error``; the same data sets for every method, so differences are paired):
      A0 passes when it is best, or within 2 paired s.e. of the best baseline (every registered
      initialiser and Haar-random A; not the Fisher–gradient LoRA-DA), at every N. Reported per
      N: the best baseline, A0's rank, A0 against the practical LoRA-DA
      (ΔW = −J⁻¹G, not a baseline), the bound's relative gap to the measured error and the
      un-relaxed prediction's gap. A method that wins is a finding, never tuned away.
Broken input: A0 taken from the r *largest* eigenvectors of Ω. It fails 10a, and 10b even at
one N with 60 data sets (``run(broken=True, parts="b", ns=(100,), reps=60)``, ~5 s, in the
default tests): z = 6–9 there (10.9–16.7 at the quick setting), against the threshold 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.eigen import fix_signs
from lora_da_ref.reference.guidance import guidance_matrix
from lora_da_ref.reference.initializers import INITIALIZERS, InitProblem, initialize
from lora_da_ref.reference.linalg import random_orthonormal
from lora_da_ref.reference.monte_carlo import monte_carlo_error
from lora_da_ref.reference.objective import expected_error_bound, unrelaxed_variance
from lora_da_ref.reference.synthetic import SyntheticModel
from proofs_check._problems import EPS
from proofs_check._record import ClaimResult, Mode, check_mode
from proofs_check.models import MODEL_NAMES, SHORT, direction, make_model, population_gradient

REF_A = "Thm 4.1/4.2, (13), (19)"
REF_B = "Thm 4.1/4.2, (11)"
R = 2
C_DISP = 5.0  # ‖ΔW‖_F·√N: bias N‖ΔW‖² = 25 is comparable to the variance N·tr(…) ≈ 20–50
K_SE = 2.0  # A0 passes within 2 paired s.e. of the best baseline: a tie at about 95 %
SETTINGS = {
    "quick": {"ns": (100, 400, 1600), "reps": 150, "draws": 2000},
    "full": {"ns": (100, 400, 1600, 6400), "reps": 600, "draws": 20000},
}
# Bounds are sums of O(d1·d2) terms of size O(‖Ω‖); eigh is backward stable: 1e3·eps relative.
ROUNDOFF = 1e3 * EPS
A0_NAME = "A0 (lora_da, oracle ΔW)"
FG_NAME = "lora_da (ΔW = −J⁻¹G)"  # the practical LoRA-DA: reported, not one of the baselines


@dataclass(frozen=True)
class Setting:
    model: SyntheticModel
    W0: np.ndarray  # (d1, d2)
    delta: np.ndarray  # ΔW = W_tgt − W0, (d1, d2)
    J: np.ndarray  # J(W0), (d1·d2, d1·d2)
    G: np.ndarray  # population gradient at W0, (d1, d2)
    n: int


def make_setting(name: str, n: int, seed: int) -> Setting:
    """The documented setting for model ``name`` at sample size ``n`` (same W0, D for every n)."""
    model = make_model(name)
    rng = np.random.default_rng(seed)
    W0, D = model.random_weight(rng), direction(model, rng)
    delta = C_DISP * D / np.sqrt(n)
    G = population_gradient(model, W0, W0 + delta)
    return Setting(model, W0, delta, model.population_fisher(W0), G, n)


def method_subspaces(s: Setting, broken: bool = False) -> dict[str, np.ndarray]:
    """A (d1, r) of A0 (first), every registered initialiser, and Fisher–gradient LoRA-DA."""
    oracle = InitProblem(s.W0, s.G, s.J, s.n, delta_w=s.delta)
    out = {A0_NAME: initialize("lora_da", oracle, R)[0]}
    if broken:
        omega = guidance_matrix(s.J, s.delta, s.n)
        out[A0_NAME] = fix_signs(np.linalg.eigh(omega)[1][:, -R:])
    for name in INITIALIZERS:
        if name != "lora_da":
            out[name] = initialize(name, oracle, R, np.random.default_rng(0))[0]
    out[FG_NAME] = initialize("lora_da", InitProblem(s.W0, s.G, s.J, s.n), R)[0]
    return out


def _bound(s: Setting, A: np.ndarray) -> float:
    return s.n * expected_error_bound(A, s.J, s.delta, s.n).total


def _deterministic(s: Setting, subspaces, draws: int, rng) -> tuple[float, dict]:
    names = list(subspaces)
    b0 = _bound(s, subspaces[names[0]])
    gaps = {k: _bound(s, subspaces[k]) - b0 for k in names[1:]}
    rand = min(_bound(s, random_orthonormal(s.W0.shape[0], R, rng)) for _ in range(draws))
    worst = min(min(gaps.values()), rand - b0)
    details = {"N·bound(A0)": b0, "min N·bound gap, random A": rand - b0}
    details.update({f"N·bound gap {k}": v for k, v in gaps.items()})
    return worst, details


def _monte_carlo(s: Setting, subspaces, reps: int, seed: int) -> dict[str, np.ndarray]:
    """N·‖Ŵ − W_tgt‖² per data set, for every method on the same data sets."""
    W_tgt = s.W0 + s.delta
    return {
        k: s.n
        * monte_carlo_error(s.model, s.W0, W_tgt, A, s.n, reps, np.random.default_rng(seed)).errors
        for k, A in subspaces.items()
    }


def _paired(errs: dict[str, np.ndarray], a: str, b: str) -> tuple[float, float]:
    """Mean and paired s.e. of ``errs[a] − errs[b]`` (same data sets)."""
    diff = errs[a] - errs[b]
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def _compare(s: Setting, subspaces, errs: dict[str, np.ndarray]) -> tuple[float, dict]:
    """z of A0 against the best baseline, and the reported extras."""
    a0 = A0_NAME
    means = {k: float(v.mean()) for k, v in errs.items()}
    pool = [k for k in errs if k != FG_NAME]  # A0 and the baselines (not the Fisher–gradient one)
    best = min(pool, key=means.get)
    diff, se = _paired(errs, a0, best)
    z = diff / se if best != a0 and se > 0 else 0.0
    bound = _bound(s, subspaces[a0])
    var = unrelaxed_variance(subspaces[a0], s.J, s.delta.shape[1], s.n)
    unrel = s.n * (var + expected_error_bound(subspaces[a0], s.J, s.delta, s.n).bias)
    m0, se0 = means[a0], float(errs[a0].std(ddof=1) / np.sqrt(errs[a0].size))
    fg_diff, fg_se = _paired(errs, a0, FG_NAME)
    return z, {
        f"N={s.n}: N·err A0 (± s.e.)": f"{m0:.3f} ± {se0:.3f}",
        f"N={s.n}: best baseline": f"{min((k for k in pool if k != a0), key=means.get)} "
        f"{min(means[k] for k in pool if k != a0):.3f}",
        f"N={s.n}: A0 rank among A0 + {len(pool) - 1} baselines": sorted(pool, key=means.get).index(
            a0
        )
        + 1,
        f"N={s.n}: A0 − LoRA-DA(ΔW=−J⁻¹G) (paired s.e.)": f"{fg_diff:.3f} ({fg_se:.3f})",
        f"N={s.n}: bound gap (bound − err)/err": (bound - m0) / m0,
        f"N={s.n}: un-relaxed gap (pred − err)/err": (unrel - m0) / m0,
    }


def run(
    mode: Mode = "quick",
    *,
    broken: bool = False,
    seed: int = 10,
    parts: str = "ab",
    ns: tuple[int, ...] | None = None,
    reps: int | None = None,
) -> list[ClaimResult]:
    """Claim 10: per model, row 10a-<model> (bound) and 10b-<model> (Monte-Carlo).

    ``ns`` and ``reps`` override the mode's sample sizes and Monte-Carlo data sets (10b)."""
    cfg = dict(SETTINGS[check_mode(mode)])
    cfg["ns"] = cfg["ns"] if ns is None else tuple(ns)
    cfg["reps"] = cfg["reps"] if reps is None else reps
    rows = []
    for name in MODEL_NAMES:
        short = SHORT[name]
        if "a" in parts:
            s = make_setting(name, cfg["ns"][0], seed)
            worst, det = _deterministic(
                s, method_subspaces(s, broken), cfg["draws"], np.random.default_rng(seed)
            )
            rows.append(
                ClaimResult(
                    f"10a-{short}",
                    REF_A,
                    f"{name}: min over competitors of N·(bound(A) − bound(A0))",
                    worst,
                    -ROUNDOFF * max(abs(det["N·bound(A0)"]), 1.0),
                    ">=",
                    "1e3·eps·|bound| (eigh / trace round-off)",
                    details=det,
                )
            )
        if "b" in parts:
            zs, det = [], {}
            for n in cfg["ns"]:
                s = make_setting(name, n, seed)
                sub = method_subspaces(s, broken)
                z, d = _compare(s, sub, _monte_carlo(s, sub, cfg["reps"], seed + n))
                zs.append(z)
                det.update(d)
            rows.append(
                ClaimResult(
                    f"10b-{short}",
                    REF_B,
                    f"{name}: max over N of (err(A0) − best baseline)/paired s.e., {cfg['reps']} reps",
                    max(zs),
                    K_SE,
                    "<=",
                    "A0 best or within 2 s.e. of the best (a tie at about 95 %)",
                    details=det,
                )
            )
    return rows
