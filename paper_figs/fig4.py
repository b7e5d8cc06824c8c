"""Fig. 4 — final metric against the LoRA rank r ∈ {1, 2, 4, 8, 16} for LoRA, LoRA-One's subspace
(B0 = 0) and LoRA-DA.

Softmax task of ``paper_figs.task`` (``W`` 16×4, N = 2000, calibration |S| = 256), several seeds (each
draws a new ``W0``, ``W_tgt`` and training set; all ranks and methods share them). Metrics as in
Table 7 (``paper_figs.task.METRICS``), mean ± s.d. over seeds. At r = 16 = d1 every ``A`` spans the whole
input space, so the A-frozen metrics of all methods must coincide there (a built-in sanity check).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from paper_figs.output import (
    METHOD_LABELS,
    ItemResult,
    plot_sweep,
    save_figure,
    write_series_csv,
)
from paper_figs.task import (
    METRICS,
    N_CALIB,
    evaluate,
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
)

SEED0 = 200
RANKS = (1, 2, 4, 8, 16)
# LoRA-DA's rank curve beside the two rows that separate calibration noise from the method
# (docs/regime.md): the debiased estimator (variance weight 1/N + 1/|S|, |S| = N_CALIB) and LoRA-DA
# from population statistics (exact J(W0), population G: no calibration noise).
METHODS = ("lora", "lora_one_subspace", "lora_da", "lora_da_debiased", "lora_da_population")


def measure(k: int, steps: int) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {metric: (k, len(RANKS)) values}}``."""
    from paper_figs.table7 import population_problem

    raw = {m: {key: np.zeros((k, len(RANKS))) for key in METRICS} for m in METHODS}
    for i, seed in enumerate(range(SEED0, SEED0 + k)):
        task = make_task("softmax", seed)
        calib = dataclasses.replace(task.init_problem(), n_calib=N_CALIB)
        problems = {"lora_da_population": population_problem(task)}
        for j, r in enumerate(RANKS):
            for m in METHODS:
                name = "lora_da" if m == "lora_da_population" else m
                factors = init_factors(task, name, r, seed, problems.get(m, calib))
                scores = evaluate(task, factors, steps)
                for key, v in scores.items():
                    raw[m][key][i, j] = v
    return raw


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k, steps = n_seeds(quick, seeds), n_steps(quick)
    raw = measure(k, steps)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 4))
    panels = {key: title + " (lower is better)" for key, title in METRICS.items()}
    series = plot_sweep(axes, raw, panels, RANKS, "rank r")
    fig.suptitle(f"Fig. 4 analogue: metric vs rank (softmax task, mean ± s.d. over {k} seeds)")
    fig.tight_layout()
    png, csv_path = out / "fig4.png", out / "fig4.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    parts = []
    for m in METHODS:
        mean, _ = mean_sd(raw[m]["trained_excess"])
        parts.append(f"{METHOD_LABELS[m]} " + "/".join(f"{v:.4f}" for v in mean))
    summary = f"fig4 excess loss (A trained) at r={RANKS}: " + "; ".join(parts)
    return ItemResult(png, csv_path, plotted, summary)
