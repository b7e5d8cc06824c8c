"""Table 7 — ablation of LoRA-DA's guidance matrix, with PiSSA and MiLoRA, on the synthetic task.

Softmax task of ``_common`` (``W`` 16×4, N = 2000, calibration |S| = 256, rank 2), several seeds
(each seed draws a new ``W0``, ``W_tgt`` and training set). Initialisers (``lora_da_ref``'s
registry, all from the same calibration statistics):

* LoRA-DA: Ω = (1/N) Σ_i J⁻¹_[i] − ΔWΔWᵀ with ΔW = −J⁻¹G (Eqs. 19, 21);
* w/o bias: Ω = variance term only; w/o variance: Ω = −ΔWΔWᵀ;
* w/o variance & Fisher: Ω = −GGᵀ (Remark 4.3, i.e. LoRA-One's subspace with LoRA-DA's B0 = −AᵀG);
* PiSSA / MiLoRA: top / bottom singular vectors of W0; LoRA-One; vanilla LoRA;
* a reference row that is not a method: LoRA-DA with the *oracle* statistics of the theorems, the
  true ΔW = W_tgt − W0 and the exact population Fisher J(W0) — what Theorem 4.2 ranks, free of
  calibration noise.

Three metrics (``_common.METRICS``), mean ± s.d. over seeds: the analysis' quantity ‖Ŵ − W_tgt‖_F at
the constrained MLE with A frozen (Eq. 11; lower is better), and the held-out excess target loss
after the shared Adam budget with A frozen and with A trained.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from lora_da_ref.initializers import InitProblem
from paper_figs._common import (
    METHOD_COLORS,
    METHOD_LABELS,
    METRICS,
    RANK,
    ItemResult,
    Series,
    Task,
    evaluate,
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
    plot_points,
    save_figure,
    write_series_csv,
)

SEED0 = 100  # seeds 100, 101, … (disjoint from the figures' seeds 0, 1, …)
METHODS = (
    "lora_da",
    "lora_da_no_bias",
    "lora_da_no_variance",
    "lora_da_no_variance_no_fisher",
    "pissa",
    "milora",
    "lora_one",
    "lora",
    "lora_da_oracle",
)


def measure(k: int, steps: int) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {metric: (k,) per-seed values}}``."""
    raw = {m: {key: [] for key in METRICS} for m in METHODS}
    for seed in range(SEED0, SEED0 + k):
        task = make_task("softmax", seed)
        problem, oracle = task.init_problem(), oracle_problem(task)
        for m in METHODS:
            name, p = ("lora_da", oracle) if m == "lora_da_oracle" else (m, problem)
            scores = evaluate(task, init_factors(task, name, RANK["softmax"], seed, p), steps)
            for key, v in scores.items():
                raw[m][key].append(v)
    return {m: {key: np.array(v) for key, v in d.items()} for m, d in raw.items()}


def oracle_problem(task: Task) -> InitProblem:
    """The theorems' inputs without estimation error: exact J(W0) and ΔW = W_tgt − W0."""
    J = task.model.population_fisher(task.W0)  # (d1·d2, d1·d2)
    G = task.model.gradient(task.W0, task.X, task.Y)  # unused when delta_w is given
    return InitProblem(task.W0, G, J, task.n, delta_w=task.W_tgt - task.W0)


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k, steps = n_seeds(quick, seeds), n_steps(quick)
    raw = measure(k, steps)
    series = []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 5))
    for ax, (key, title) in zip(axes, METRICS.items()):
        for i, m in enumerate(METHODS):
            mean, sd = mean_sd(raw[m][key])
            s = Series(
                key, METHOD_LABELS[m], np.array([float(i)]), np.array([mean]), np.array([sd])
            )
            plot_points(ax, s, color=METHOD_COLORS[m], fmt="o", ms=7)
            series.append(s)
        ax.set_title(title + " (lower is better)", fontsize=9)
        ax.set_xticks(
            range(len(METHODS)), [METHOD_LABELS[m] for m in METHODS], rotation=60, ha="right"
        )
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"Table 7 analogue (softmax task, rank {RANK['softmax']}, mean ± s.d. over {k} seeds)"
    )
    fig.tight_layout()
    png, csv_path, seeds_csv = out / "table7.png", out / "table7.csv", out / "table7_seeds.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    _write_seeds(seeds_csv, raw)
    summary = "table7 ‖Ŵ − W_tgt‖_F (A frozen, MLE) | excess loss (A trained): " + ", ".join(
        f"{METHOD_LABELS[m]} {raw[m]['converged_distance'].mean():.3f} | "
        f"{raw[m]['trained_excess'].mean():.4f}"
        for m in METHODS
    )
    return ItemResult(png, csv_path, plotted, summary, (seeds_csv,))


def _write_seeds(path: Path, raw) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "seed", "value"])
        for m, d in raw.items():
            for key, vals in d.items():
                w.writerows([m, key, SEED0 + i, repr(float(v))] for i, v in enumerate(vals))
