"""Fig. 3 — descent trajectories on the synthetic softmax and logistic tasks.

Every method trains from ``W0`` with the same full-batch Adam (lr 0.02) for the same number of
steps (``paper_figs.task``): full fine-tuning, vanilla LoRA (Haar-random orthonormal ``A``, ``B = 0``),
LoRA-One's subspace (``lora_one_subspace``: ``A`` = top-r left singular vectors of ``−G``,
``B = 0``; not the official LoRA-One, whose ``B0 ≠ 0``) and LoRA-DA (``A0`` from
Eq. (19), ``B0 = A0ᵀΔW``, Eq. 17), each with ``A`` frozen (LoRA-FA, the analysis) and with ``A``
trainable. Rank 2 (softmax, ``W`` 16×4) and 1 (logistic, ``W`` 16×1).

Top row: the trajectories ``W_t − W0`` of seed 0 projected on the plane spanned by
``e1 = (W_tgt − W0)/‖W_tgt − W0‖`` and ``e2`` = the part of the raw full-data gradient direction
``−G`` orthogonal to ``e1`` (Frobenius inner product), over filled contours of the held-out excess
target loss ``E_x KL(p_tgt ‖ p_W)`` on that plane; ``W0`` is the origin, ``W_tgt`` is at
``(‖ΔW‖, 0)``. The projection drops the components off the plane, so the bottom row gives the
full distance ``‖W_t − W_tgt‖_F`` per step (mean ± s.d. over seeds).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from paper_figs.output import (
    METHOD_COLORS,
    METHOD_LABELS,
    ItemResult,
    Series,
    plot_series,
    save_figure,
    write_series_csv,
)
from paper_figs.task import (
    RANK,
    Task,
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
    train,
)

SEED0 = 0
KINDS = ("softmax", "logistic")
# (method, A trainable?) — full FT has no A.
RUNS = (
    ("full", True),
    ("lora", False),
    ("lora", True),
    ("lora_one_subspace", False),
    ("lora_one_subspace", True),
    ("lora_da", False),
    ("lora_da", True),
)
GRID = 40
QUICK_GRID = 25


def run_name(method: str, train_a: bool) -> str:
    if method == "full":
        return METHOD_LABELS["full"]
    return f"{METHOD_LABELS[method]} ({'A trained' if train_a else 'A frozen'})"


def trajectories(task: Task, seed: int, steps: int) -> dict[str, np.ndarray]:
    """``{run name: W_t (T+1, d1, d2)}`` for every run of :data:`RUNS`."""
    problem = task.init_problem()
    out = {}
    for method, train_a in RUNS:
        factors = (
            None if method == "full" else init_factors(task, method, RANK[task.kind], seed, problem)
        )
        out[run_name(method, train_a)] = train(task, factors, train_a=train_a, steps=steps).W
    return out


def plane(task: Task) -> np.ndarray:
    """Orthonormal (Frobenius) basis ``(2, d1, d2)``: ``W_tgt − W0`` and the raw gradient ``−G``."""
    e1 = task.W_tgt - task.W0
    e1 = e1 / np.linalg.norm(e1)
    g = -task.model.gradient(task.W0, task.X, task.Y)  # (d1, d2)
    e2 = g - np.vdot(g, e1) * e1
    return np.stack([e1, e2 / np.linalg.norm(e2)])


def project(W: np.ndarray, W0: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Coordinates ``(T+1, 2)`` of ``W − W0`` on the plane."""
    return np.einsum("tij,kij->tk", W - W0, basis)


def contour_grid(task: Task, basis: np.ndarray, pts: np.ndarray, n: int):
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = 0.15 * (hi - lo) + 1e-3
    a = np.linspace(lo[0] - pad[0], hi[0] + pad[0], n)
    b = np.linspace(lo[1] - pad[1], hi[1] + pad[1], n)
    Z = np.array([[task.excess_loss(task.W0 + x * basis[0] + y * basis[1]) for x in a] for y in b])
    return a, b, Z  # Z[j, i] at (a[i], b[j])


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    steps, k = n_steps(quick), n_seeds(quick, seeds)
    series: list[Series] = []
    contours = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for col, kind in enumerate(KINDS):
        dists = {}
        for seed in range(SEED0, SEED0 + k):
            task = make_task(kind, seed)
            trajs = trajectories(task, seed, steps)
            for name, W in trajs.items():
                dists.setdefault(name, []).append(np.linalg.norm(W - task.W_tgt, axis=(1, 2)))
            if seed == SEED0:
                series += _plane_panel(axes[0, col], task, trajs, contours, quick)
        series += _distance_panel(axes[1, col], kind, dists, steps, k)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("Fig. 3 analogue: descent trajectories from W0 (same Adam, lr, steps for all)")
    fig.tight_layout()
    png, csv_path, contour_csv = out / "fig3.png", out / "fig3.csv", out / "fig3_contours.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    _write_contours(contour_csv, contours)
    final = {s.name: s.y[-1] for s in series if s.panel == "softmax-distance"}
    summary = "fig3 softmax final ‖W_T − W_tgt‖_F: " + ", ".join(
        f"{n} {v:.3f}" for n, v in final.items()
    )
    return ItemResult(png, csv_path, plotted, summary, (contour_csv,))


def _plane_panel(ax, task: Task, trajs, contours, quick: bool) -> list[Series]:
    basis = plane(task)
    pts = {name: project(W, task.W0, basis) for name, W in trajs.items()}
    tgt = project(task.W_tgt[None], task.W0, basis)[0]
    allpts = np.vstack([*pts.values(), tgt[None], np.zeros((1, 2))])
    a, b, Z = contour_grid(task, basis, allpts, QUICK_GRID if quick else GRID)
    cs = ax.contourf(a, b, Z, levels=14, cmap="Greys")
    plt.colorbar(cs, ax=ax, label="excess target loss (KL)")
    contours += [(task.kind, x, y, Z[j, i]) for j, y in enumerate(b) for i, x in enumerate(a)]
    panel = f"{task.kind}-plane"
    out = []
    for (method, train_a), (name, P) in zip(RUNS, pts.items()):
        s = Series(panel, name, P[:, 0], P[:, 1])
        plot_series(ax, s, color=METHOD_COLORS[method], ls="-" if train_a else "--", lw=1.4)
        ax.plot(*P[0], "o", color=METHOD_COLORS[method], ms=4)
        out.append(s)
    ax.plot(0, 0, "k*", ms=12)
    ax.annotate("W0", (0, 0), textcoords="offset points", xytext=(5, 5))
    ax.plot(*tgt, "r*", ms=14)
    ax.annotate("W_tgt", tgt, textcoords="offset points", xytext=(5, 5), color="red")
    ax.set_xlabel("⟨W − W0, e1⟩,  e1 ∝ W_tgt − W0")
    ax.set_ylabel("⟨W − W0, e2⟩,  e2 ∝ −G ⊥ e1")
    ax.set_title(f"{task.kind}: trajectories (seed 0, rank {RANK[task.kind]}), dots = start")
    return out


def _distance_panel(ax, kind: str, dists, steps: int, k: int) -> list[Series]:
    out = []
    x = np.arange(steps + 1, dtype=np.float64)
    for (method, train_a), (name, d) in zip(RUNS, dists.items()):
        m, sd = mean_sd(np.array(d))
        s = Series(f"{kind}-distance", name, x, m, sd)
        plot_series(ax, s, color=METHOD_COLORS[method], ls="-" if train_a else "--", lw=1.4)
        out.append(s)
    ax.set_xlabel("step")
    ax.set_ylabel("‖W_t − W_tgt‖_F")
    ax.set_title(f"{kind}: distance to the target (mean ± s.d., {k} seeds)")
    return out


def _write_contours(path: Path, rows) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "a", "b", "excess_loss"])
        w.writerows([k, f"{x:.7g}", f"{y:.7g}", f"{z:.7g}"] for k, x, y, z in rows)
