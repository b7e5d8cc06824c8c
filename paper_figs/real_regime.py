"""Real regime: is the initialisation's subspace determined by |S| GSM8K problems on SmolLM2?

For calibration sets ``|S| ∈ SIZES`` (prefixes of the GSM8K fit split, cut as in
``benchmarks/gsm8k_finetune.py``: the last 24 prompt and the first 48 completion tokens, batch
size 1), and every target projection of the decoder layers ``LAYERS``, the split-half stability
of each method's r-dimensional subspace:

* LoRA-DA (``official``, ``default``, ``debiased`` presets, ``n_train`` = ``fisher_units`` of the
  fit split): ``calibration_diagnostics`` with the split-half solves — A0 of the even- and of the
  odd-numbered sequences (shared K-FAC Fisher), their largest and smallest principal angles, the
  mean squared cosine of the angles (``split_mean_cos2``; r/d for two random subspaces), the
  relative regret of one half's A under the other's Ω, and the plug-in SNR;
* LoRA-One: the top-r left singular vectors of −G_even and −G_odd (G of the same statistics,
  ``gradient_weight="sequence"``: LoRA-One's per-sequence mean gradient), the same angles, the
  regret under Ω_h = −G_h G_hᵀ (relative to r‖Ω_h‖₂), and the split-half SNR of G
  (``(‖G‖² − noise)/noise``, ``noise = ‖G_even − G_odd‖² w_e w_o / W²``).

One pass: the statistics are accumulated chunk by chunk over [0, 32), [32, 128), [128, 512),
[512, 1000) and the chunks' ``KFACSums`` added, so each prefix's statistics are those of one pass
over it. Every boundary is even, so a sequence's even/odd half is its parity in the whole stream.

**Determined** (a definition): the smallest |S| at which the median over layers of the largest
split-half angle is below π/4, i.e. the two halves' subspaces share every direction to better
than 45°. Each half holds |S|/2 sequences, so this is a statement about |S|/2 as well. The mean
cos² > 0.5 criterion is reported beside it. Spearman's ρ of SNR against the largest angle over
(layer, |S|) pairs says whether the SNR predicts the stability (ρ < 0: a higher SNR, a smaller
angle).

Writes ``real_regime.png``, ``real_regime.csv`` (plotted medians), ``real_regime_layers.csv``
(every layer, method and |S|) and ``real_regime.json`` (Spearman ρ and the determined |S|).
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paper_figs.output import ItemResult, Series, plot_series, save_figure

torch.manual_seed(0)

SIZES = (32, 128, 512, 1000)
LAYERS = (0, 6, 12, 18, 24, 29)  # 6 of the 30 decoder layers × 7 projections = 42 layers
QUICK_SIZES = (4, 8)
QUICK_LAYERS = (0,)
QUICK_PROJECTIONS = ("q_proj", "v_proj")  # d_in = 576: the quick run stays under a minute
PROMPT_TOKENS, COMPLETION_TOKENS = 24, 48  # as benchmarks/gsm8k_finetune.py
RANK = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora_da_official", "lora_da_default", "lora_da_debiased", "lora_one")
METRICS = ("split_angle_max", "split_angle_min", "split_mean_cos2", "split_rel_regret", "snr")
DETERMINED_ANGLE = math.pi / 4
COLORS = {
    "lora_da_official": "tab:green",
    "lora_da_default": "tab:olive",
    "lora_da_debiased": "darkgreen",
    "lora_one": "tab:orange",
}


def targets_of(
    model: Any, layers: tuple[int, ...], projections: tuple[str, ...] = PROJECTIONS
) -> dict[str, torch.nn.Linear]:
    from lora_da_ref.torch import find_target_modules

    found = find_target_modules(model, projections)
    return {n: m for n, m in found.items() if int(n.split(".layers.")[1].split(".")[0]) in layers}


def add_sums(total: Any, part: Any) -> Any:
    """``total + part`` of two ``KFACSums`` over disjoint sequences (every field is additive)."""
    if total is None:
        return part
    for kind in ("Z", "Y", "G", "G_odd"):
        for k, v in getattr(part, kind).items():
            getattr(total, kind)[k].add_(v)
    for k in (
        "tokens",
        "loss_tokens",
        "gradient_weight",
        "split_weight",
        "sequences",
        "batches",
        "skipped_batches",
    ):
        setattr(total, k, getattr(total, k) + getattr(part, k))
    return total


def prefix_statistics(model: Any, examples: list, targets: dict, config: Any, sizes: tuple):
    """Yield ``(|S|, KFACStatistics of the first |S| examples)`` from one chunked pass."""
    from lora_da_ref.torch.statistics import accumulate_statistics, finalize

    if any(s % 2 for s in sizes[:-1]):
        raise ValueError(f"chunk boundaries must be even (split-half parity): {sizes}")
    total, start = None, 0
    for stop in sizes:
        batches = [
            {k: e[k][None] for k in ("input_ids", "attention_mask", "labels")}
            for e in examples[start:stop]
        ]
        part = accumulate_statistics(model, batches, targets, config, progress=False)
        total = add_sums(total, part)
        yield stop, finalize(copy.deepcopy(total))
        start = stop


def lora_one_split(stats: Any, name: str) -> dict[str, float]:
    """Split-half stability of LoRA-One's subspace (top-r left singular vectors of −G_h)."""
    from lora_da_ref.torch.diagnostics import principal_angles

    even, odd = (g.double() for g in stats.halves(name))
    A = [torch.linalg.svd(-g, full_matrices=False)[0][:, :RANK] for g in (even, odd)]
    angles = principal_angles(A[0], A[1])
    omega2 = -odd @ odd.mT  # (d_in, d_in)
    regret = float(torch.trace(A[0].mT @ omega2 @ A[0]) - torch.trace(A[1].mT @ omega2 @ A[1]))
    w1, w2 = stats.split_weights
    G = stats.G[name].double()
    noise = float((even - odd).square().sum()) * w1 * w2 / (w1 + w2) ** 2
    signal = float(G.square().sum())
    return {
        "split_angle_max": float(angles.max()),
        "split_angle_min": float(angles.min()),
        "split_mean_cos2": float(torch.cos(angles).square().mean()),
        "split_rel_regret": regret / (RANK * float(torch.linalg.svdvals(odd)[0]) ** 2),
        "snr": (signal - noise) / noise if noise > 0 else math.inf,
    }


def lora_da_split(stats: Any, name: str, config: Any) -> dict[str, float]:
    from lora_da_ref.torch.diagnostics import calibration_diagnostics
    from lora_da_ref.torch.factors import kfac_fisher

    try:
        d = calibration_diagnostics(stats, name, config, kfac_fisher(stats, name, config))
    except ValueError:  # absolute damping and a singular Z (fewer tokens than inputs): no solve
        return {k: math.nan for k in METRICS}
    return {**{k: d[k] for k in METRICS if k != "snr"}, "snr": d["calibration_snr"]}


def measure(quick: bool) -> list[dict[str, Any]]:
    sizes, layers = (QUICK_SIZES, QUICK_LAYERS) if quick else (SIZES, LAYERS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine 2 threads ran 4-10x slower than 1
    try:
        return _measure(quick, sizes, layers)
    finally:
        torch.set_num_threads(threads)


def _measure(quick: bool, sizes: tuple[int, ...], layers: tuple[int, ...]) -> list[dict]:
    from lora_da_ref.real import gsm8k, load_smollm2, tokenize_gsm8k
    from lora_da_ref.torch import LoraDAConfig
    from lora_da_ref.torch.diagnostics import fisher_units

    model, tok = load_smollm2(torch.float32)
    fit = [
        tokenize_gsm8k(
            tok, r, max_prompt_tokens=PROMPT_TOKENS, max_completion_tokens=COMPLETION_TOKENS
        )
        for r in gsm8k("fit")
    ]
    counts = {
        "sequences": len(fit),
        "loss_tokens": sum(int((e["labels"] != -100).sum()) for e in fit),
        "attention_tokens": sum(int(e["attention_mask"].sum()) for e in fit),
    }
    default = LoraDAConfig(rank=RANK, target_modules=PROJECTIONS, diagnostics="full")
    n_train = fisher_units(default, **counts)
    configs = {
        "lora_da_official": LoraDAConfig.official(
            rank=RANK, target_modules=PROJECTIONS, diagnostics="full", n_train=n_train
        ),
        "lora_da_default": default.replace(n_train=n_train),
        "lora_da_debiased": default.replace(n_train=n_train, estimator="debiased"),
    }
    targets = targets_of(model, layers, QUICK_PROJECTIONS if quick else PROJECTIONS)
    rows = []
    for size, stats in prefix_statistics(model, fit, targets, default, sizes):
        for name, module in targets.items():
            base = {"n_calib": size, "layer": name, "d_in": module.in_features}
            for method, config in configs.items():
                rows.append({**base, "method": method, **lora_da_split(stats, name, config)})
            rows.append({**base, "method": "lora_one", **lora_one_split(stats, name)})
    return rows


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Medians per (method, |S|), Spearman ρ(SNR, largest angle), the determined |S|."""
    from scipy.stats import spearmanr

    out: dict[str, Any] = {"determined_angle": DETERMINED_ANGLE, "methods": {}}
    sizes = sorted({r["n_calib"] for r in rows})
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        med = {
            s: {k: float(np.nanmedian([r[k] for r in mine if r["n_calib"] == s])) for k in METRICS}
            for s in sizes
        }
        random_cos2 = float(np.median([RANK / r["d_in"] for r in mine]))
        ok = [r for r in mine if math.isfinite(r["snr"]) and math.isfinite(r["split_angle_max"])]
        rho = spearmanr([r["snr"] for r in ok], [r["split_angle_max"] for r in ok])[0]
        by_angle = [s for s in sizes if med[s]["split_angle_max"] < DETERMINED_ANGLE]
        by_cos2 = [s for s in sizes if med[s]["split_mean_cos2"] > 0.5]
        out["methods"][m] = {
            "median_by_size": {str(s): v for s, v in med.items()},
            "random_mean_cos2": random_cos2,
            "spearman_snr_vs_angle_max": float(rho) if len(ok) > 2 else math.nan,
            "pairs": len(ok),
            "determined_at": by_angle[0] if by_angle else None,
            "determined_at_cos2": by_cos2[0] if by_cos2 else None,
        }
    return out


def draw(summary: dict) -> tuple[Any, list[Series]]:
    import matplotlib.pyplot as plt

    panels = {
        "split_angle_max": "median largest split-half angle (rad)",
        "split_mean_cos2": "median mean cos² of the angles",
        "split_rel_regret": "median relative regret",
        "snr": "median SNR",
    }
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    series = []
    for ax, (key, title) in zip(axes, panels.items()):
        for m, e in summary["methods"].items():
            xs = np.array([float(s) for s in e["median_by_size"]])
            ys = np.array([v[key] for v in e["median_by_size"].values()])
            s = Series(key, m, xs, ys)
            plot_series(ax, s, color=COLORS[m], marker="o")
            series.append(s)
        if key == "split_mean_cos2":
            ref = next(iter(summary["methods"].values()))["random_mean_cos2"]
            ax.axhline(ref, color="gray", ls=":", label="random subspaces (r/d)")
        if key == "split_angle_max":
            ax.axhline(DETERMINED_ANGLE, color="gray", ls=":", label="π/4")
        if key == "snr":
            ax.set_yscale("symlog")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("|S| (GSM8K problems)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, GSM8K: split-half stability of the r = 8 subspace")
    return fig, series


def run(out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    """``seeds`` is not used (no randomness beyond the seeded solvers)."""
    rows = measure(quick)
    summary = summarise(rows)
    fig, series = draw(summary)
    png, csv_path = out / "real_regime.png", out / "real_regime.csv"
    layers_csv, json_path = out / "real_regime_layers.csv", out / "real_regime.json"
    plotted = save_figure(fig, png)
    from paper_figs.output import write_series_csv

    write_series_csv(csv_path, series)
    with layers_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "n_calib", "layer", "d_in", *METRICS])
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({"quick": quick, **summary}, indent=1) + "\n")
    text = ", ".join(
        f"{m}: determined at {e['determined_at']}, ρ(SNR, angle) {e['spearman_snr_vs_angle_max']:.2f}"
        for m, e in summary["methods"].items()
    )
    return ItemResult(png, csv_path, plotted, f"real_regime {text}", (layers_csv, json_path))
