"""Appendix J — LoRA-DA against the calibration-set size |S| ∈ {16, 64, 256, 1024}.

Softmax task of ``paper_figs.task`` (``W`` 16×4, so the Fisher has p = 64 parameters; N = 2000, rank 2),
several seeds. For each |S| the statistics ``G`` and the damped empirical Fisher are computed on
the first |S| training pairs. Panels: the three metrics of Table 7 (``paper_figs.task.METRICS``), and the
largest principal angle between ``A0(S)`` and the *large-sample* ``A0``, computed the same way from
2^15 fresh pairs of the target distribution. LoRA-One's subspace (top-r singular vectors of −G
from the same S, B0 = 0) is shown for reference. Mean ± s.d. over seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from lora_da_ref.reference.linalg import principal_angles
from paper_figs.output import (
    ItemResult,
    plot_sweep,
    save_figure,
    write_series_csv,
)
from paper_figs.task import (
    METRICS,
    RANK,
    evaluate,
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
)

SEED0 = 300
SIZES = (16, 64, 256, 1024)
LARGE = 2**15
METHODS = ("lora_one_subspace", "lora_da")
PANELS = {**METRICS, "angle": "largest principal angle to the large-sample A0 (degrees)"}


def measure(k: int, steps: int) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {panel: (k, len(SIZES)) values}}``."""
    r = RANK["softmax"]
    raw = {m: {key: np.zeros((k, len(SIZES))) for key in PANELS} for m in METHODS}
    for i, seed in enumerate(range(SEED0, SEED0 + k)):
        task = make_task("softmax", seed)
        X, Y = task.model.sample(task.W_tgt, LARGE, np.random.default_rng([seed, 99]))
        large = task.init_problem(X=X, Y=Y)
        for m in METHODS:
            A_large = init_factors(task, m, r, seed, large)[0]
            for j, size in enumerate(SIZES):
                factors = init_factors(task, m, r, seed, task.init_problem(size))
                scores = evaluate(task, factors, steps)
                scores["angle"] = np.degrees(principal_angles(factors[0], A_large)[-1])
                for key, v in scores.items():
                    raw[m][key][i, j] = v
    return raw


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k, steps = n_seeds(quick, seeds), n_steps(quick)
    raw = measure(k, steps)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4))
    series = plot_sweep(axes, raw, PANELS, SIZES, "calibration-set size |S|")
    fig.suptitle(
        f"App. J analogue: calibration-set size (softmax task, p = 64, mean ± s.d. over {k} seeds)"
    )
    fig.tight_layout()
    png, csv_path = out / "fisher_samples.png", out / "fisher_samples.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    ang, _ = mean_sd(raw["lora_da"]["angle"])
    exc, _ = mean_sd(raw["lora_da"]["trained_excess"])
    summary = (
        f"fisher_samples LoRA-DA at |S|={SIZES}: angle to large-sample A0 (deg) "
        + "/".join(f"{v:.1f}" for v in ang)
        + "; excess loss (A trained) "
        + "/".join(f"{v:.4f}" for v in exc)
    )
    return ItemResult(png, csv_path, plotted, summary)
