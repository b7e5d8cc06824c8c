"""Regime map — when does LoRA-DA beat LoRA-One? Shift size × calibration size.

Claim 14 (``proofs_check.calibration_noise``): the plug-in ``ΔŴ = −Ĵ⁻¹Ĝ`` from ``|S|`` calibration
pairs carries noise of covariance ≈ ``J⁻¹/|S|``, so ``E[Ω̂] ≈ (1/N − 1/|S|) Σ_i J⁻¹_[i] − ΔWΔWᵀ``.
The theorems rank initialisations for ‖ΔW‖ = O(1/√N) and exact statistics; this item measures the
ranking over a grid of

* shift size ``ΔW`` (logit RMS on the pool, :data:`SHIFTS`; shown as multiples of 1/√N), and
* calibration size ``|S|`` (:data:`CALIB_SIZES`, plus population statistics, ``|S| = ∞``),

at fixed ``N`` = :data:`N`, on three synthetic models (softmax, logistic, linear-Gaussian; the
softmax and logistic settings are ``paper_figs.task``'s task with the shift size varied). Each seed draws
``W0``, the shift direction (the same for every shift size: cells are paired across the grid) and
one calibration sample of :data:`S_MAX` pairs from ``p(·; W_tgt)``, independent of the training
data; the ``|S|`` columns use its first ``|S|`` pairs (nested). Statistics as in ``paper_figs.task``:
mean gradient and damped empirical Fisher (true labels) at ``W0``.

Metric: ``E‖Ŵ − W_tgt‖²_F`` on fresh training data of size N at the constrained MLE with ``A``
frozen (Eq. 11), from the asymptotic sandwich formula for the misspecified constrained MLE
(:func:`sandwich_error`: pseudo-true ``B*``, ``bias = ‖W0 + AB* − W_tgt‖²``,
``variance = tr(H⁻¹CH⁻¹)/N``), checked against ``lora_da_ref.monte_carlo_error`` in
``regime_mc_check.csv``. Methods: :data:`METHODS` (``lora_one_subspace``, "LoRA-One" in the
titles and "One" in the cells: LoRA-One's subspace; the metric depends on ``col(A)`` only, so the
official LoRA-One, whose A spans it, scores the same; ``lora_da_population``: exact ``J(W0)`` and
population ``G``; ``lora_da_oracle``: the true ΔW and exact J — references, not methods).
The winner is taken among the practical methods :data:`PRACTICAL`. Cells: mean over seeds; the
difference LoRA-DA − LoRA-One is paired per seed (mean ± s.e.). SNR = ‖ΔW‖²·|S| / tr(Σ_i J⁻¹_[i])
(exact J), averaged over seeds.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from lora_da_ref.reference.initializers import InitProblem, initialize
from lora_da_ref.reference.linalg import kron_average, random_orthonormal, unvec, vec
from lora_da_ref.reference.monte_carlo import monte_carlo_error
from lora_da_ref.reference.synthetic import (
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    SyntheticModel,
)
from paper_figs.output import (
    ItemResult,
    round_sig,
    save_figure,
)
from paper_figs.task import (
    D1,
    FISHER_DAMPING,
    N_CLASSES,
    N_TRAIN,
    POOL_SEED,
    SHIFT_DECAY,
    W0_SCALE,
)
from proofs_check.models import MEAN_MAP, population_gradient

N = N_TRAIN
SHIFTS = (0.03, 0.1, 0.3, 1.0, 2.0)  # logit RMS of ΔW on the pool (× √N ≈ 1.3 … 89)
CALIB_SIZES = (64, 256, 1024, 4096, 16384)
S_MAX = max(CALIB_SIZES)
POP = 0  # the population-statistics column (|S| = ∞) in the CSVs
MODELS = ("softmax", "logistic", "linear_gaussian")
RANKS = {"softmax": 2, "logistic": 1, "linear_gaussian": 2}
SEEDS, QUICK_SEEDS = 40, 6  # the quick run's seeds are the first QUICK_SEEDS of the full run
METHODS = (
    "lora",
    "lora_one_subspace",
    "lora_da",
    "lora_da_no_bias",
    "lora_da_no_variance",
    "lora_da_damped",
    "lora_da_debiased",
    "lora_da_population",
    "lora_da_oracle",
)
PRACTICAL = METHODS[:7]
SHORT = {
    "lora": "LoRA",
    "lora_one_subspace": "One",
    "lora_da": "DA",
    "lora_da_no_bias": "DA-nb",
    "lora_da_no_variance": "DA-nv",
    "lora_da_damped": "DA-damp",
    "lora_da_debiased": "DA-deb",
    "lora_da_population": "DA-pop",
    "lora_da_oracle": "oracle",
}
COLORS = {
    "lora": "tab:blue",
    "lora_one_subspace": "tab:orange",
    "lora_da": "tab:green",
    "lora_da_no_bias": "tab:olive",
    "lora_da_no_variance": "tab:cyan",
    "lora_da_damped": "tab:purple",
    "lora_da_debiased": "tab:red",
}
MC_CHECK = {  # (model, shift, |S|, method): sandwich vs monte_carlo_error, seed 0
    "quick": {"cases": (("softmax", 1.0, 256, "lora_da"),), "reps": 60},
    "full": {
        "cases": tuple(
            (m, s, 256, meth)
            for m in MODELS
            for s in (0.1, 1.0)
            for meth in ("lora_da", "lora_one_subspace")
        ),
        "reps": 400,
    },
}
NEWTON_TOL = 1e-10  # relative step size at which the pseudo-true B* is accepted
NEWTON_MAX = 50


# ---- models, draws, statistics ------------------------------------------------------------------
def make_model(kind: str) -> SyntheticModel:
    factories = {
        "softmax": lambda: SoftmaxRegression(D1, N_CLASSES, seed=POOL_SEED),
        "logistic": lambda: LogisticRegression(D1, seed=POOL_SEED),
        "linear_gaussian": lambda: LinearGaussian(D1, N_CLASSES - 1, seed=POOL_SEED),
    }
    return factories[kind]()


@dataclass(frozen=True)
class Draw:
    """One seed's ``W0``, unit-logit-RMS shift direction and calibration sample (from W_tgt)."""

    model: SyntheticModel
    W0: np.ndarray
    direction: np.ndarray  # logit RMS 1 on the pool
    shift: float

    @property
    def delta(self) -> np.ndarray:
        return self.shift * self.direction

    @property
    def W_tgt(self) -> np.ndarray:
        return self.W0 + self.delta


def make_draw(model: SyntheticModel, kind: str, seed: int, shift: float) -> Draw:
    """``W0`` (logit scale 2) and ΔW = U diag(0.5^k) Vᵀ scaled to logit RMS ``shift`` (``paper_figs.task``)."""
    rng = np.random.default_rng([seed, MODELS.index(kind), 11])
    W0 = model.random_weight(rng, scale=W0_SCALE)
    d1, d2 = model.shape
    U, V = random_orthonormal(d1, d2, rng), random_orthonormal(d2, d2, rng)
    D = U @ np.diag(SHIFT_DECAY ** np.arange(d2)) @ V.T
    D /= np.sqrt(np.mean((model.pool @ D) ** 2))
    return Draw(model, W0, D, shift)


def calibration_sample(draw: Draw, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``S_MAX`` pairs from ``p(·; W_tgt)``; column ``|S|`` uses the first ``|S|``."""
    rng = np.random.default_rng([seed, MODELS.index(kind), SHIFTS.index(draw.shift), 13])
    return draw.model.sample(draw.W_tgt, S_MAX, rng)


def calibration_problem(draw: Draw, X: np.ndarray, Y: np.ndarray) -> InitProblem:
    """LoRA-DA's statistics on ``(X, Y)``: mean gradient and damped empirical Fisher at W0."""
    m = draw.model
    G = m.gradient(draw.W0, X, Y)
    J = m.empirical_fisher(draw.W0, X, Y)
    J = J + FISHER_DAMPING * np.trace(J) / J.shape[0] * np.eye(J.shape[0])
    return InitProblem(draw.W0, G, J, N, n_calib=X.shape[0])


def population_problem(draw: Draw, *, oracle: bool = False) -> InitProblem:
    """Exact ``J(W0)`` and population ``G`` (``oracle``: also the true ΔW)."""
    m = draw.model
    G = population_gradient(m, draw.W0, draw.W_tgt)
    J = m.population_fisher(draw.W0)
    return InitProblem(draw.W0, G, J, N, delta_w=draw.delta if oracle else None)


def snr(draw: Draw, n_calib: int) -> float:
    """``‖ΔW‖²·|S| / tr(Σ_i J⁻¹_[i])`` with the exact ``J(W0)``."""
    J = population_problem(draw).J
    return float(np.sum(draw.delta**2) * n_calib / np.trace(J.inverse_block_sum()))


# ---- the error of a frozen A: asymptotic sandwich ------------------------------------------------
# Log-partition ψ(f) of each canonical-link model (∇ψ = the mean map of proofs_check.models), so
# the population target NLL is E_x[ψ(F) − ⟨E_tgt[T(y)|x], F⟩] + const.
_LOG_PARTITION = {
    LogisticRegression: lambda m, F: np.logaddexp(0.0, F[:, 0]),
    SoftmaxRegression: lambda m, F: np.logaddexp.reduce(
        np.concatenate([F, np.zeros((F.shape[0], 1))], axis=1), axis=1
    ),
    LinearGaussian: lambda m, F: 0.5 * np.sum((F @ np.linalg.inv(m.noise_cov)) * F, axis=1),
}


@dataclass(frozen=True)
class Sandwich:
    total: float
    bias: float
    variance: float


def sandwich_error(draw: Draw, A: np.ndarray, n: int = N) -> Sandwich:
    """Asymptotic ``E‖W0 + A B̂ − W_tgt‖²`` of the constrained MLE on n fresh pairs (Eq. 11).

    ``B̂ → B* = argmin_B E_tgt[NLL(W0 + AB)]`` (the model is misspecified: ``W_tgt ∉ W0 + col A``)
    and ``√n vec(B̂ − B*) → N(0, H⁻¹CH⁻¹)`` with ``H = E_x[Λ(x; W*) ⊗ uuᵀ]``, ``u = Aᵀx``,
    ``C = E_x[(Λ(x; W_tgt) + δδᵀ) ⊗ uuᵀ]``, ``δ = E_tgt[e|x] − E_*[e|x]`` (canonical links). For
    orthonormal ``A``: ``E‖Ŵ − W_tgt‖² ≈ ‖W0 + AB* − W_tgt‖² + tr(H⁻¹CH⁻¹)/n``.
    """
    m = draw.model
    mean_map = MEAN_MAP[type(m)]
    X = m.pool
    U = X @ A  # (M, r)
    F0, m_tgt = X @ draw.W0, mean_map(m, X @ draw.W_tgt)
    r, d2 = A.shape[1], m.d2
    psi = _LOG_PARTITION[type(m)]

    def loss(B: np.ndarray) -> float:  # population target NLL (up to a constant), convex in B
        F = F0 + U @ B
        return float(np.mean(psi(m, F) - np.sum(m_tgt * F, axis=1)))

    B = np.linalg.lstsq(A, draw.delta, rcond=None)[0]  # (r, d2)
    L = loss(B)
    for _ in range(NEWTON_MAX):
        F = F0 + U @ B
        g = -U.T @ (m_tgt - mean_map(m, F)) / X.shape[0]  # (r, d2) population gradient in B
        H = kron_average(m._output_fisher(F), U)
        step = -unvec(np.linalg.solve(H, vec(g)), r, d2)
        if np.linalg.norm(step) <= NEWTON_TOL * (1.0 + np.linalg.norm(B)):
            B = B + step
            break
        t, slope = 1.0, float(np.vdot(g, step))
        slack = 16 * np.finfo(np.float64).eps * max(abs(L), 1.0)  # round-off of the loss
        while loss(B + t * step) > L + 1e-4 * t * slope + slack and t > 1e-12:  # Armijo
            t *= 0.5
        B = B + t * step
        L = loss(B)
    else:
        raise RuntimeError("Newton for the pseudo-true B* did not converge")
    F = F0 + U @ B
    delta = m_tgt - mean_map(m, F)  # (M, d2)
    H = kron_average(m._output_fisher(F), U)
    C = kron_average(m._output_fisher(X @ draw.W_tgt) + delta[:, :, None] * delta[:, None, :], U)
    Hinv = np.linalg.inv(H)
    variance = float(np.trace(Hinv @ C @ Hinv)) / n
    bias = float(np.sum((draw.W0 + A @ B - draw.W_tgt) ** 2))
    return Sandwich(bias + variance, bias, variance)


# ---- the grid -----------------------------------------------------------------------------------
def _factors(method: str, problem: InitProblem, r: int, seed: int) -> np.ndarray:
    name = method if method in PRACTICAL else "lora_da"
    return initialize(name, problem, r, np.random.default_rng([seed, 7]))[0]


def measure_cell_seed(kind: str, shift: float, seed: int) -> dict[tuple[int, str], float]:
    """``{(|S| or POP, method): E‖Ŵ − W_tgt‖²}`` for one (model, shift, seed)."""
    model = make_model(kind)
    draw = make_draw(model, kind, seed, shift)
    r = RANKS[kind]
    X, Y = calibration_sample(draw, kind, seed)
    pop, oracle = population_problem(draw), population_problem(draw, oracle=True)
    refs = {
        "lora_da_population": sandwich_error(draw, _factors("lora_da", pop, r, seed)).total,
        "lora_da_oracle": sandwich_error(draw, _factors("lora_da", oracle, r, seed)).total,
    }
    out: dict[tuple[int, str], float] = {}
    for s in (*CALIB_SIZES, POP):
        problem = pop if s == POP else calibration_problem(draw, X[:s], Y[:s])
        for meth in PRACTICAL:
            out[(s, meth)] = sandwich_error(draw, _factors(meth, problem, r, seed)).total
        out.update({(s, k): v for k, v in refs.items()})
    return out


def measure(seeds: int) -> dict[tuple[str, float, int, str], np.ndarray]:
    """``{(model, shift, |S|, method): (seeds,) errors}`` (seed i is seed i in every run)."""
    acc: dict[tuple[str, float, int, str], list[float]] = {}
    for kind in MODELS:
        for shift in SHIFTS:
            for seed in range(seeds):
                for (s, meth), v in measure_cell_seed(kind, shift, seed).items():
                    acc.setdefault((kind, shift, s, meth), []).append(v)
    return {k: round_sig(np.array(v)) for k, v in acc.items()}


def mean_snr(kind: str, shift: float, n_calib: int, seeds: int) -> float:
    model = make_model(kind)
    return float(np.mean([snr(make_draw(model, kind, i, shift), n_calib) for i in range(seeds)]))


@dataclass(frozen=True)
class Cell:
    model: str
    shift: float
    n_calib: int
    winner: str
    diff: float  # LoRA-DA − LoRA-One, paired mean
    diff_se: float
    snr: float


def summarise(raw, seeds: int) -> list[Cell]:
    cells = []
    for kind in MODELS:
        for shift in SHIFTS:
            for s in (*CALIB_SIZES, POP):
                means = {m: raw[(kind, shift, s, m)].mean() for m in PRACTICAL}
                d = raw[(kind, shift, s, "lora_da")] - raw[(kind, shift, s, "lora_one_subspace")]
                se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
                snr_v = np.inf if s == POP else mean_snr(kind, shift, s, seeds)
                cells.append(
                    Cell(kind, shift, s, min(means, key=means.get), float(d.mean()), se, snr_v)
                )
    return cells


# ---- Monte-Carlo check of the sandwich ----------------------------------------------------------
def mc_check(mode: str) -> list[dict[str, object]]:
    """Sandwich vs ``monte_carlo_error`` (constrained MLE on fresh data sets) for a few cases."""
    cfg = MC_CHECK[mode]
    rows = []
    for kind, shift, s, meth in cfg["cases"]:
        model = make_model(kind)
        draw = make_draw(model, kind, 0, shift)
        X, Y = calibration_sample(draw, kind, 0)
        A = _factors(meth, calibration_problem(draw, X[:s], Y[:s]), RANKS[kind], 0)
        sw = sandwich_error(draw, A)
        mc = monte_carlo_error(
            model, draw.W0, draw.W_tgt, A, N, cfg["reps"], np.random.default_rng([0, 17])
        )
        rows.append(
            {
                "model": kind,
                "shift": shift,
                "n_calib": s,
                "method": meth,
                "sandwich": sw.total,
                "sandwich_variance": sw.variance,
                "mc_mean": mc.mean,
                "mc_se": mc.std_error,
                "z": (mc.mean - sw.total) / mc.std_error,
                "reps": cfg["reps"],
            }
        )
    return rows


# ---- output -------------------------------------------------------------------------------------
def _col_label(s: int) -> str:
    return "pop" if s == POP else str(s)


def _draw_maps(cells: list[Cell], seeds: int) -> plt.Figure:
    fig, axes = plt.subplots(len(MODELS), 2, figsize=(15, 4.2 * len(MODELS)))
    cols = (*CALIB_SIZES, POP)
    cmap = ListedColormap([COLORS[m] for m in PRACTICAL])
    for row, kind in enumerate(MODELS):
        mine = {(c.shift, c.n_calib): c for c in cells if c.model == kind}
        win = np.array([[PRACTICAL.index(mine[(sh, s)].winner) for s in cols] for sh in SHIFTS])
        rel = np.array(
            [
                [mine[(sh, s)].diff / max(mine[(sh, s)].diff_se, 1e-300) for s in cols]
                for sh in SHIFTS
            ]
        )
        ax_w, ax_d = axes[row]
        ax_w.imshow(win, cmap=cmap, vmin=-0.5, vmax=len(PRACTICAL) - 0.5, aspect="auto")
        ax_d.imshow(np.clip(rel, -8, 8), cmap="RdBu_r", vmin=-8, vmax=8, aspect="auto")
        for i, sh in enumerate(SHIFTS):
            for j, s in enumerate(cols):
                c = mine[(sh, s)]
                snr_txt = "SNR ∞" if s == POP else f"SNR {c.snr:.3g}"
                ax_w.text(
                    j,
                    i,
                    f"{SHORT[c.winner]}\n{snr_txt}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
                ax_d.text(
                    j,
                    i,
                    f"{c.diff:+.3g}\n±{c.diff_se:.2g}\n{snr_txt}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                )
        for ax in (ax_w, ax_d):
            ax.set_xticks(range(len(cols)), [_col_label(s) for s in cols])
            ax.set_yticks(
                range(len(SHIFTS)), [f"{sh:g} ({sh * np.sqrt(N):.3g}/√N)" for sh in SHIFTS]
            )
            ax.set_xlabel("calibration size |S|  (pop = population statistics)")
            ax.set_ylabel("ΔW logit RMS")
        ax_w.set_title(f"{kind}: winner of E‖Ŵ−W_tgt‖² (r={RANKS[kind]}, N={N})", fontsize=9)
        ax_d.set_title(f"{kind}: LoRA-DA − LoRA-One (paired, ± s.e.; colour = z)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[m]) for m in PRACTICAL]
    fig.legend(handles, [SHORT[m] for m in PRACTICAL], loc="lower center", ncol=len(PRACTICAL))
    fig.suptitle(f"When does LoRA-DA beat LoRA-One? ({seeds} seeds per cell)")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def write_cells_csv(path: Path, raw, cells: list[Cell]) -> None:
    """One row per (model, shift, |S|, method): mean, s.e., and the cell's winner/diff/SNR."""
    info = {(c.model, c.shift, c.n_calib): c for c in cells}
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "model",
                "shift",
                "shift_sqrtN",
                "n_calib",
                "method",
                "mean",
                "se",
                "seeds",
                "snr",
                "winner",
                "da_minus_one",
                "da_minus_one_se",
            ]
        )
        for (kind, shift, s, meth), v in raw.items():
            c = info[(kind, shift, s)]
            se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
            w.writerow(
                [
                    kind,
                    shift,
                    repr(float(round_sig(shift * np.sqrt(N)))),
                    s,
                    meth,
                    repr(float(round_sig(v.mean()))),
                    repr(float(round_sig(se))),
                    v.size,
                    repr(float(round_sig(c.snr))) if np.isfinite(c.snr) else "inf",
                    c.winner,
                    repr(float(round_sig(c.diff))),
                    repr(float(round_sig(c.diff_se))),
                ]
            )


def write_seeds_csv(path: Path, raw) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "shift", "n_calib", "method", "seed", "error"])
        for (kind, shift, s, meth), v in raw.items():
            w.writerows([kind, shift, s, meth, i, repr(float(x))] for i, x in enumerate(v))


def read_seeds_csv(path: Path) -> dict[tuple[str, float, int, str], np.ndarray]:
    acc: dict[tuple[str, float, int, str], dict[int, float]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["model"], float(row["shift"]), int(row["n_calib"]), row["method"])
            acc.setdefault(key, {})[int(row["seed"])] = float(row["error"])
    return {k: np.array([d[i] for i in sorted(d)]) for k, d in acc.items()}


def write_mc_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def regime_table(cells: list[Cell], kind: str) -> str:
    """Markdown table: winner and LoRA-DA − LoRA-One ± s.e. (SNR) per (shift, |S|)."""
    cols = (*CALIB_SIZES, POP)
    mine = {(c.shift, c.n_calib): c for c in cells if c.model == kind}
    head = "| ΔW logit RMS (×1/√N) | " + " | ".join(f"\\|S\\|={_col_label(s)}" for s in cols)
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for sh in SHIFTS:
        parts = []
        for s in cols:
            c = mine[(sh, s)]
            snr_txt = "∞" if s == POP else f"{c.snr:.2g}"
            parts.append(f"{SHORT[c.winner]}; {c.diff:+.3g} ± {c.diff_se:.2g} (SNR {snr_txt})")
        lines.append(f"| {sh:g} ({sh * np.sqrt(N):.2g}) | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k = seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    mode = "quick" if quick else "full"
    raw = measure(k)
    cells = summarise(raw, k)
    fig = _draw_maps(cells, k)
    png, csv_path = out / "regime.png", out / "regime.csv"
    seeds_csv, mc_csv, md = out / "regime_seeds.csv", out / "regime_mc_check.csv", out / "regime.md"
    plotted = save_figure(fig, png)
    write_cells_csv(csv_path, raw, cells)
    write_seeds_csv(seeds_csv, raw)
    mc = mc_check(mode)
    write_mc_csv(mc_csv, mc)
    md.write_text("\n\n".join(f"### {m}\n\n{regime_table(cells, m)}" for m in MODELS) + "\n")
    soft = [c for c in cells if c.model == "softmax" and c.n_calib in (256, POP)]
    summary = (
        "regime softmax LoRA-DA − LoRA-One: "
        + ", ".join(
            f"shift {c.shift:g} |S| {_col_label(c.n_calib)}: {c.diff:+.3g}±{c.diff_se:.2g}"
            for c in soft
        )
        + f"; sandwich vs MC max |z| {max(abs(r['z']) for r in mc):.2f}"
    )
    return ItemResult(png, csv_path, plotted, summary, (seeds_csv, mc_csv, md))
