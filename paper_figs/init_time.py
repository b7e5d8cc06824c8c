"""Appendix G — LoRA-DA's initialisation time against training time, for r ∈ {1, 2, 4, 8, 16}.

Tiny-LLaMA setting of ``_tiny_llama`` (CPU, one torch thread). For each rank and seed: the wall
time of ``init_lora_da`` (statistics pass over the calibration set + per-layer eigen-solve) with
the official and with the paper preset, and the wall time of the LoRA fine-tuning that follows
(one epoch, the shared recipe, started from the official-preset initialisation). Plotted: the
share of initialisation in the total, ``t_init / (t_init + t_train)`` (the paper reports ≈ 6 %
for LLaMA 2-7B on a GPU, at every rank), and the absolute times; mean ± s.d. over 3 repeats (seeds).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from paper_figs import _tiny_llama as tl
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
    mean_sd,
    n_seeds,
)

SEED0 = 500
RANKS = (1, 2, 4, 8, 16)
REPEATS = 3  # timing repeats (seeds) of the full run; --seeds overrides, --quick uses 2
PRESETS = ("official", "paper")


def init_seconds(preset: str, seed: int, quick: bool, rank: int) -> float:
    """Wall time of Algorithm 1 (statistics + eigen-solves) on the pre-trained tiny LLaMA."""
    sc, data = tl.scale_of(quick), tl.target_data(seed, quick)
    base, calib = tl.base_model(quick), data.calibration(sc.n_calib)
    t0 = time.perf_counter()
    tl.lora_da_prepare(base, calib, preset, len(data.train), rank)
    return time.perf_counter() - t0


def measure(k: int, quick: bool) -> dict[str, np.ndarray]:
    """``{"init_official", "init_paper", "train": (k, len(RANKS)) seconds}``."""
    out = {f"init_{p}": np.zeros((k, len(RANKS))) for p in PRESETS}
    out["train"] = np.zeros((k, len(RANKS)))
    with tl.single_thread():
        tl.pretrained(quick)  # pre-training is not part of either time
        for i, seed in enumerate(range(SEED0, SEED0 + k)):
            for j, r in enumerate(RANKS):
                for p in PRESETS:
                    out[f"init_{p}"][i, j] = init_seconds(p, seed, quick, r)
                out["train"][i, j] = tl.finetune(
                    "lora_da_official", seed, quick, rank=r
                ).train_seconds
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k = n_seeds(quick, seeds) if quick or seeds is not None else REPEATS
    raw = measure(k, quick)
    x = np.array(RANKS, dtype=np.float64)
    series = []
    fig, (ax_share, ax_abs) = plt.subplots(1, 2, figsize=(11, 4))
    for p in PRESETS:
        key, color = f"lora_da_{p}", METHOD_COLORS[f"lora_da_{p}"]
        share = 100 * raw[f"init_{p}"] / (raw[f"init_{p}"] + raw["train"])
        s = Series("share", METHOD_LABELS[key], x, *mean_sd(share))
        plot_points(ax_share, s, color=color, fmt="-o", ms=5)
        s2 = Series("seconds", f"init, {METHOD_LABELS[key]}", x, *mean_sd(raw[f"init_{p}"]))
        plot_points(ax_abs, s2, color=color, fmt="-o", ms=5)
        series += [s, s2]
    s3 = Series("seconds", "training (one epoch)", x, *mean_sd(raw["train"]))
    plot_points(ax_abs, s3, color="black", fmt="-s", ms=5)
    series.append(s3)
    for ax, ylabel in ((ax_share, "init share of total time (%)"), (ax_abs, "wall time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(r) for r in RANKS])
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"App. G analogue: initialisation vs training time (tiny LLaMA, CPU, {k} seeds)")
    fig.tight_layout()
    png, csv_path = out / "init_time.png", out / "init_time.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    parts = [f"{s.name} " + "/".join(f"{v:.1f}" for v in s.y) for s in series if s.panel == "share"]
    summary = f"init_time init share (%) at r={RANKS}: " + "; ".join(parts)
    return ItemResult(png, csv_path, plotted, summary)
