"""Fig. 2 (tiny LLaMA) with the learning rate selected per method, and scale-swap controls.

The tiny-LLaMA row of ``fig2`` trains every method at one untuned learning rate (1e-3), at which
LoRA-DA's official preset starts from factors scaled by ~1/√γ and LoRA-One's subspace from
orthonormal ones: the ranking may be the learning rate's and the scale's, not the subspace's.
Here, in the setting of ``_tiny_llama`` (same model, data, recipe):

* every method (LoRA, LoRA-One's subspace with B0 = 0, LoRA-DA's official preset) is trained at
  each learning rate of :data:`LRS`; the learning rate is **selected per method on a validation
  split** (target sequences disjoint from training and held-out data; the mean final validation
  loss over seeds), and the held-out metrics are reported at that rate;
* two **scale-swap controls** separate subspace from scale (both with B0 = 0):
  ``lora_one_subspace_at_da_scale`` = LoRA-One's subspace with LoRA-DA's per-layer scale
  ‖A_DA‖_F/√r; ``lora_da_at_one_scale`` = an orthonormal basis of LoRA-DA's subspace (the
  scale of ``lora_one_subspace``).

Output: held-out accuracy and loss at the selected learning rate (mean ± s.d. over seeds), the
validation loss of every (method, learning rate), and the selected rates (CSV).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from paper_figs import _tiny_llama as tl
from paper_figs.output import (
    ItemResult,
    Series,
    plot_points,
    save_figure,
    write_series_csv,
)
from paper_figs.task import (
    mean_sd,
)

SEED0 = 400  # fig2's seeds
LRS = (1e-3, 3e-3, 1e-2)
QUICK_LRS = (1e-3, 1e-2)
SEEDS, QUICK_SEEDS = 1, 1  # one full-scale run is minutes on 2 shared cores: raise with --seeds
# The paper preset (β = α = 1, unscaled B0) diverges at every learning rate here (held-out accuracy
# ≈ 0.01 in fig2 and in a quick run of this item at 1e-3 and 1e-2), so it is left out.
METHODS = (*(m for m in tl.METHODS if m != "lora_da_paper"), *tl.CONTROLS)
LABELS = {
    "lora": "LoRA",
    "lora_one_subspace": "LoRA-One subspace, B0 = 0",
    "lora_da_official": "LoRA-DA (official)",
    "lora_da_paper": "LoRA-DA (paper)",
    "lora_one_subspace_at_da_scale": "LoRA-One subspace, DA scale",
    "lora_da_at_one_scale": "LoRA-DA subspace, One scale",
}
_STATE_OF = {  # methods whose initialiser state is shared (computed once per seed)
    "lora_one_subspace_at_da_scale": "controls",
    "lora_da_at_one_scale": "controls",
}


def measure(seeds: int, quick: bool, lrs: tuple[float, ...]) -> dict[str, np.ndarray]:
    """``{metric: (len(METHODS), len(lrs), seeds)}`` for val_loss, test_loss, test_accuracy."""
    shape = (len(METHODS), len(lrs), seeds)
    out = {k: np.full(shape, np.nan) for k in ("val_loss", "test_loss", "test_accuracy")}
    with tl.single_thread():
        for s in range(seeds):
            seed = SEED0 + s
            states: dict[str, object] = {}
            for i, m in enumerate(METHODS):
                key = _STATE_OF.get(m, m)
                if key not in states:
                    states[key] = tl.prepare_state(m, seed, quick)
                for j, lr in enumerate(lrs):
                    run = tl.finetune(m, seed, quick, lr=lr, state=states[key])
                    out["val_loss"][i, j, s] = run.val_loss
                    out["test_loss"][i, j, s] = run.eval_loss[-1]
                    out["test_accuracy"][i, j, s] = run.eval_accuracy[-1]
                    print(  # progress; the log holds every run's numbers
                        f"fig2_lr {m} lr={lr:g} seed={seed}: val {run.val_loss:.4f} "
                        f"test acc {run.eval_accuracy[-1]:.4f}",
                        flush=True,
                    )
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k = seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    lrs = QUICK_LRS if quick else LRS
    raw = measure(k, quick, lrs)
    best = np.nanargmin(raw["val_loss"].mean(axis=2), axis=1)  # (methods,) selected lr index
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series: list[Series] = []
    for i, m in enumerate(METHODS):
        mean, sd = mean_sd(raw["val_loss"][i], axis=1)
        s = Series("val_loss", LABELS[m], np.array(lrs), mean, sd)
        plot_points(axes[0], s, fmt="-o", ms=4)
        series.append(s)
        for ax, key in zip(axes[1:], ("test_accuracy", "test_loss")):
            mean, sd = mean_sd(raw[key][i, best[i]][None, :], axis=1)
            s = Series(key, LABELS[m], np.array([float(i)]), mean, sd)
            plot_points(ax, s, fmt="o", ms=7)
            series.append(s)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate")
    axes[0].set_title("validation loss (selection split)", fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, title in zip(axes[1:], ("held-out accuracy", "held-out loss")):
        ax.set_xticks(
            range(len(METHODS)),
            [f"{LABELS[m]}\nlr {lrs[b]:g}" for m, b in zip(METHODS, best)],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.set_title(f"{title} at the selected learning rate", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Tiny LLaMA, learning rate selected per method on a validation split ({k} seeds)")
    fig.tight_layout()
    png, csv_path, lr_csv = out / "fig2_lr.png", out / "fig2_lr.csv", out / "fig2_lr_runs.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    with lr_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "lr", "seed", "selected", "val_loss", "test_loss", "test_accuracy"])
        for i, m in enumerate(METHODS):
            for j, lr in enumerate(lrs):
                for s in range(k):
                    w.writerow(
                        [
                            m,
                            lr,
                            SEED0 + s,
                            int(j == best[i]),
                            *(
                                repr(float(raw[key][i, j, s]))
                                for key in ("val_loss", "test_loss", "test_accuracy")
                            ),
                        ]
                    )
    summary = "fig2_lr held-out accuracy at the validation-selected lr: " + ", ".join(
        f"{LABELS[m]} {raw['test_accuracy'][i, best[i]].mean():.4f} (lr {lrs[best[i]]:g})"
        for i, m in enumerate(METHODS)
    )
    return ItemResult(png, csv_path, plotted, summary, (lr_csv,))
