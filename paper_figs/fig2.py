"""Fig. 2 — training loss, gradient norm and held-out accuracy against step.

Row 1, synthetic: the softmax task of ``paper_figs.task`` (``W`` 16×4, N = 2000, |S| = 256,
rank 2); LoRA, LoRA-One's subspace (B0 = 0, not the official LoRA-One) and LoRA-DA with A and B
trained by the shared full-batch Adam (lr 0.02). Gradient norm = ‖∇_(A,B) L‖ of the trainable
parameters; accuracy = exact expected held-out accuracy against labels drawn from the target,
``E_x p_tgt(argmax_k p_W(k|x) | x)``.

Row 2, tiny LLaMA (``_tiny_llama``): a small ``LlamaForCausalLM`` pre-trained on a source Markov
language and LoRA-fine-tuned on a shifted target language (AdamW, cosine schedule with warm-up,
r = 8, alpha = 16, all linear layers); LoRA, LoRA-One's subspace (B0 = 0) and LoRA-DA with its
official and its paper preset. Held-out next-token accuracy on target-language sequences.

Mean ± s.d. over seeds in both rows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from paper_figs import _tiny_llama as tl
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
    init_factors,
    make_task,
    mean_sd,
    n_seeds,
    n_steps,
    train,
)

SEED0 = 400
METHODS = ("lora", "lora_one_subspace", "lora_da")
PANELS = {
    "train_loss": "training loss",
    "grad_norm": "gradient norm",
    "accuracy": "held-out accuracy",
    "excess_loss": "held-out excess target loss",
}
LLAMA_PANELS = {
    "train_loss": "training loss",
    "grad_norm": "gradient norm",
    "eval_accuracy": "held-out next-token accuracy",
    "eval_loss": "held-out target loss",
}


def synthetic_curves(k: int, steps: int) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {panel: (k, steps + 1)}}`` on the softmax task, A trained."""
    curves = {m: {p: [] for p in PANELS} for m in METHODS}
    for seed in range(SEED0, SEED0 + k):
        task = make_task("softmax", seed)
        problem = task.init_problem()
        for m in METHODS:
            h = train(
                task,
                init_factors(task, m, RANK["softmax"], seed, problem),
                train_a=True,
                steps=steps,
            )
            for p in PANELS:
                curves[m][p].append(getattr(h, p))
    return {m: {p: np.array(v) for p, v in d.items()} for m, d in curves.items()}


def llama_curves(k: int, quick: bool) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """``{method: {panel: (k, points)}}`` of the tiny-LLaMA fine-tuning runs, and the eval steps."""
    curves = {m: {p: [] for p in LLAMA_PANELS} for m in tl.METHODS}
    with tl.single_thread():
        for seed in range(SEED0, SEED0 + k):
            for m in tl.METHODS:
                run = tl.finetune(m, seed, quick)
                for p in LLAMA_PANELS:
                    curves[m][p].append(getattr(run, p))
    out = {m: {p: np.array(v, dtype=np.float64) for p, v in d.items()} for m, d in curves.items()}
    return out, np.array(run.eval_steps, dtype=np.float64)


def _draw_row(axes, row: str, curves, panels, xs) -> list[Series]:
    out = []
    for ax, (p, title) in zip(axes, panels.items()):
        for m, d in curves.items():
            mean, sd = mean_sd(d[p])
            s = Series(f"{row}-{p}", METHOD_LABELS[m], xs[p], mean, sd)
            plot_series(ax, s, color=METHOD_COLORS[m], lw=1.4)
            out.append(s)
        ax.set_title(f"{row}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    k, steps = n_seeds(quick, seeds), n_steps(quick)
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    syn = synthetic_curves(k, steps)
    x = np.arange(steps + 1, dtype=np.float64)
    series = _draw_row(axes[0], "synthetic", syn, PANELS, dict.fromkeys(PANELS, x))
    llama, eval_x = llama_curves(k, quick)
    t = np.arange(tl.scale_of(quick).ft_steps, dtype=np.float64)
    xs = {"train_loss": t, "grad_norm": t, "eval_accuracy": eval_x, "eval_loss": eval_x}
    series += _draw_row(axes[1], "tiny-LLaMA", llama, LLAMA_PANELS, xs)
    fig.suptitle(f"Fig. 2 analogue (mean ± s.d. over {k} seeds)")
    fig.tight_layout()
    png, csv_path = out / "fig2.png", out / "fig2.csv"
    plotted = save_figure(fig, png)
    write_series_csv(csv_path, series)
    acc = {METHOD_LABELS[m]: mean_sd(syn[m]["accuracy"][:, -1]) for m in METHODS}
    llama_acc = {METHOD_LABELS[m]: mean_sd(llama[m]["eval_accuracy"][:, -1]) for m in tl.METHODS}
    summary = (
        "fig2 final held-out accuracy, synthetic: "
        + ", ".join(f"{n} {m:.4f}±{s:.4f}" for n, (m, s) in acc.items())
        + "; tiny-LLaMA: "
        + ", ".join(f"{n} {m:.4f}±{s:.4f}" for n, (m, s) in llama_acc.items())
    )
    return ItemResult(png, csv_path, plotted, summary)
