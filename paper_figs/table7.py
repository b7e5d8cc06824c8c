"""Table 7 — ablation of LoRA-DA's guidance matrix, with PiSSA and MiLoRA, on the synthetic task.

Softmax task of ``paper_figs.task`` (``W`` 16×4, N = 2000, calibration |S| = 256, rank 2), several seeds
(each seed draws a new ``W0``, ``W_tgt`` and training set). Initialisers (``lora_da_ref``'s
registry, all from the same calibration statistics):

* LoRA-DA: Ω = (1/N) Σ_i J⁻¹_[i] − ΔWΔWᵀ with ΔW = −J⁻¹G (Eqs. 19, 21);
* w/o bias: Ω = variance term only; w/o variance: Ω = −ΔWΔWᵀ;
* w/o variance & Fisher: Ω = −GGᵀ (Remark 4.3, i.e. LoRA-One's subspace with LoRA-DA's B0 = −AᵀG);
* PiSSA / MiLoRA: top / bottom singular vectors of W0; LoRA-One's subspace with B0 = 0
  (``lora_one_subspace``, not the official LoRA-One); vanilla LoRA;
* two reference rows that are not methods: LoRA-DA with the *oracle* statistics of the theorems
  (the true ΔW = W_tgt − W0 and the exact population Fisher J(W0) — what Theorem 4.2 ranks), and
  LoRA-DA with *population statistics* (exact J(W0) and the population gradient G, so
  ΔW = −J⁻¹G keeps its linearisation error but has no calibration noise). The oracle removes both
  the calibration noise and the linearisation error; the population row separates the two
  (``docs/regime.md``).

Four metrics, mean ± s.d. over seeds: the analysis' quantity ‖Ŵ − W_tgt‖_F at the constrained MLE
with A frozen (Eq. 11; lower is better), and the held-out excess target loss after the shared Adam
budget with A frozen — starting from each method's own B0 (Eq. 17 for LoRA-DA, whose B0 = A0ᵀΔŴ is
unnormalised: ‖B0‖ exceeds ‖ΔW‖ when ΔŴ is noisy) and, as a control, from B0 = 0 for every
method — and with A trained.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from lora_da_ref.reference.initializers import InitProblem
from paper_figs.output import (
    METHOD_COLORS,
    METHOD_LABELS,
    ItemResult,
    Series,
    plot_points,
    save_figure,
    write_series_csv,
)
from paper_figs.task import (
    METRICS,
    RANK,
    Task,
    evaluate,
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
    train,
)
from proofs_check.models import population_gradient

SEED0 = 100  # seeds 100, 101, … (disjoint from the figures' seeds 0, 1, …)
METHODS = (
    "lora_da",
    "lora_da_no_bias",
    "lora_da_no_variance",
    "lora_da_no_variance_no_fisher",
    "pissa",
    "milora",
    "lora_one_subspace",
    "lora",
    "lora_da_oracle",
    "lora_da_population",
)
REFERENCES = {"lora_da_oracle": "oracle", "lora_da_population": "population"}
TABLE_METRICS = {
    **METRICS,
    "frozen_excess_b0_zero": "excess target loss, A frozen, B0 = 0, Adam",
}


def measure(k: int, steps: int) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {metric: (k,) per-seed values}}`` (the plotted metrics + ``b0_norm_ratio``)."""
    raw = {m: {key: [] for key in (*TABLE_METRICS, "b0_norm_ratio")} for m in METHODS}
    for seed in range(SEED0, SEED0 + k):
        task = make_task("softmax", seed)
        problems = {
            "oracle": oracle_problem(task),
            "population": population_problem(task),
            None: task.init_problem(),
        }
        for m in METHODS:
            ref = REFERENCES.get(m)
            name, p = ("lora_da" if ref else m), problems[ref]
            A0, B0 = init_factors(task, name, RANK["softmax"], seed, p)
            scores = evaluate(task, (A0, B0), steps)
            b0_zero = train(task, (A0, np.zeros_like(B0)), train_a=False, steps=steps, record=False)
            scores["frozen_excess_b0_zero"] = float(b0_zero.excess_loss[-1])
            # ‖B0‖_F / ‖ΔW‖_F (seeds CSV only): Eq. 17's B0 = A0ᵀΔŴ against the true shift.
            scores["b0_norm_ratio"] = float(
                np.linalg.norm(B0) / np.linalg.norm(task.W_tgt - task.W0)
            )
            for key, v in scores.items():
                raw[m][key].append(v)
    return {m: {key: np.array(v) for key, v in d.items()} for m, d in raw.items()}


def population_problem(task: Task) -> InitProblem:
    """Exact J(W0) and the population gradient G at W0 (data from W_tgt): ΔW = −J⁻¹G, no
    calibration noise (linearisation error only)."""
    J = task.model.population_fisher(task.W0)
    return InitProblem(task.W0, population_gradient(task.model, task.W0, task.W_tgt), J, task.n)


def oracle_problem(task: Task) -> InitProblem:
    """The theorems' inputs without estimation error: exact J(W0) and ΔW = W_tgt − W0."""
    J = task.model.population_fisher(task.W0)  # (d1·d2, d1·d2)
    G = task.model.gradient(task.W0, task.X, task.Y)  # unused when delta_w is given
    return InitProblem(task.W0, G, J, task.n, delta_w=task.W_tgt - task.W0)


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k, steps = n_seeds(quick, seeds), n_steps(quick)
    raw = measure(k, steps)
    series = []
    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(17, 5))
    for ax, (key, title) in zip(axes, TABLE_METRICS.items()):
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
    summary = (
        "table7 ‖Ŵ − W_tgt‖_F (A frozen, MLE) | excess loss A frozen (own B0 / B0 = 0) | "
        "A trained: "
        + ", ".join(
            f"{METHOD_LABELS[m]} {raw[m]['converged_distance'].mean():.3f} | "
            f"{raw[m]['frozen_excess'].mean():.4f} / {raw[m]['frozen_excess_b0_zero'].mean():.4f}"
            f" | {raw[m]['trained_excess'].mean():.4f}"
            for m in METHODS
        )
    )
    return ItemResult(png, csv_path, plotted, summary, (seeds_csv,))


def _write_seeds(path: Path, raw) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "seed", "value"])
        for m, d in raw.items():
            for key, vals in d.items():
                w.writerows([m, key, SEED0 + i, repr(float(v))] for i, v in enumerate(vals))
