"""Real regime: is the initialisation's subspace determined by |S| GSM8K problems on SmolLM2?

For calibration sets ``|S| ∈ SIZES`` (prefixes of the GSM8K fit split, cut as in
``benchmarks/gsm8k_finetune.py``: the last 24 prompt and the first 48 completion tokens, batch
size 1), and every target projection of the decoder layers ``LAYERS``, the split-half stability
of each method's r-dimensional subspace:

* LoRA-DA (``official``, ``default``, ``debiased`` presets, ``n_train`` = ``fisher_units`` of the
  fit split): ``calibration_diagnostics`` with the split-half solves — A0 of the even- and of the
  odd-numbered sequences (shared K-FAC Fisher), their largest and smallest principal angles, the
  mean squared cosine of the angles (``split_mean_cos2``; r/d for two random subspaces), the
  relative regret of one half's A under the other's Ω — and the SNR ``(‖ΔŴ‖² − noise)/noise``
  of ``ΔŴ = −Ĵ⁻¹Ĝ`` with three noise estimates: ``snr_plugin`` (the diagnostics' plug-in
  ``calibration_snr``, noise ``tr(Σ_i Ĵ⁻¹_[i])/|S|`` of the noise model), ``snr_split`` (their
  ``split_snr``, noise ``‖ΔŴ_even − ΔŴ_odd‖² w_e w_o / W²``: measured, no noise model; the same
  quantity as LoRA-One's) and ``snr_sandwich`` (the noise the *damped* estimator has under the
  plug-in's model, ``tr((Y+λ)⁻¹Y(Y+λ)⁻¹)·tr((Z+λ)⁻¹Z(Z+λ)⁻¹)/|S|``, whose λ → 0 limit is the
  plug-in noise); ``var_bias_ratio`` is ‖variance term‖₂ / ‖bias term‖₂ of the layer's Ω;
* the ablation ``lora_da_default@neg_G``: the default preset with Ω built from ``−Ĝ`` in place of
  ``ΔŴ = −Ĵ⁻¹Ĝ`` (:func:`half_omegas`): the same statistics, damping, β, α, N and eigensolver,
  the bias direction σ-normalised (``−Ĝ/σ(Ĝ)``) and the variance term that of the default's
  σ-normalised Ω (``β/(Nσ(ΔŴ)²)·Σ_i Ĵ⁻¹_[i]``), so the two terms keep the default's balance;
  its split-half angles are measured as LoRA-DA's (A0 of each half, shared Fisher;
  :func:`split_half_stability` reproduces ``calibration_diagnostics``'), its ``snr_split`` is the
  split-half SNR of Ĝ. ``lora_da_default@neg_G_literal`` passes ``−Ĝ`` through the default's own
  code path instead (the variance coefficient divided by σ(Ĝ)², not σ(ΔŴ)²): its variance term
  is then 10⁸–10¹⁶ times its bias term on SmolLM2 and A0 the top eigenvectors of the shared Z
  (split-half angle 0 by construction) — kept to show why the scale has to be matched;
* ``lora_one_subspace``, LoRA-One's subspace: the top-r left singular vectors of −G_even and
  −G_odd (:func:`lora_da_ref.torch.baselines.lora_one_subspace`; G of the same statistics,
  ``gradient_weight="sequence"``: LoRA-One's per-sequence mean gradient); the official LoRA-One's
  A spans it and B0 plays no part in a subspace, so this is also the official init's stability.
  Measured: the same angles, the regret under Ω_h = −G_h G_hᵀ (relative to r‖Ω_h‖₂), and the
  split-half SNR of G
  (``(‖G‖² − noise)/noise``, ``noise = ‖G_even − G_odd‖² w_e w_o / W²``) as ``snr_split``.

One pass: the statistics are accumulated chunk by chunk over [0, 32), [32, 128), [128, 512),
[512, 1000) and the chunks' ``KFACSums`` added, so each prefix's statistics are those of one pass
over it. Every boundary is even, so a sequence's even/odd half is its parity in the whole stream.

**Determined** (a definition): the smallest |S| at which the median over layers of the largest
split-half angle is below π/4, i.e. the two halves' subspaces share every direction to better
than 45°. Each half holds |S|/2 sequences, so this is a statement about |S|/2 as well. The mean
cos² > 0.5 criterion is reported beside it. **Spearman's ρ** of each SNR against the largest
angle is computed **within each |S|** (over that |S|'s layers; ρ < 0: a higher SNR, a smaller
angle); the ρ pooled over (layer, |S|) pairs is kept beside it only as ``pooled_confounded``:
both the SNR and the angle move with |S|, so the pooled value says little about whether the SNR
predicts a layer's stability.

Writes ``real_regime.png``, ``real_regime.csv`` (plotted medians), ``real_regime_layers.csv``
(every layer, method and |S|) and ``real_regime.json`` (medians, within-|S| and pooled ρ, the
fractions of layers with a negative SNR, and the determined |S|).
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
PRESETS = ("lora_da_official", "lora_da_default", "lora_da_debiased")
# the −Ĝ ablations of the default preset: method name -> how the variance term is scaled
ABLATIONS = {"lora_da_default@neg_G": "matched", "lora_da_default@neg_G_literal": "literal"}
METHODS = (*PRESETS, *ABLATIONS, "lora_one_subspace")
STABILITY = ("split_angle_max", "split_angle_min", "split_mean_cos2", "split_rel_regret")
SNRS = ("snr_plugin", "snr_split", "snr_sandwich")
METRICS = (*STABILITY, *SNRS, "var_bias_ratio")
DETERMINED_ANGLE = math.pi / 4
COLORS = {
    "lora_da_official": "tab:green",
    "lora_da_default": "tab:olive",
    "lora_da_debiased": "darkgreen",
    "lora_da_default@neg_G": "tab:red",
    "lora_da_default@neg_G_literal": "tab:pink",
    "lora_one_subspace": "tab:orange",
}
# the ablation lies on LoRA-One's curve and the debiased preset on the default's: other markers
MARKERS = {
    "lora_da_debiased": "s",
    "lora_da_default@neg_G": "x",
    "lora_da_default@neg_G_literal": "x",
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


def split_snr_of(even: torch.Tensor, odd: torch.Tensor, weights: tuple[float, float]) -> float:
    """``(‖M‖² − noise)/noise``, ``M = (w_e M_even + w_o M_odd)/W``, ``noise = ‖M_even −
    M_odd‖² w_e w_o / W²``: the split-half SNR of a matrix linear in Ĝ (Ĝ itself, or ΔŴ)."""
    w1, w2 = weights
    whole = (even * w1 + odd * w2) / (w1 + w2)
    noise = float((even - odd).square().sum()) * w1 * w2 / (w1 + w2) ** 2
    signal = float(whole.square().sum())
    return (signal - noise) / noise if noise > 0 else math.inf


def lora_one_subspace_split(stats: Any, name: str) -> dict[str, float]:
    """Split-half stability of LoRA-One's subspace (top-r left singular vectors of −G_h)."""
    from lora_da_ref.torch.baselines import lora_one_subspace
    from lora_da_ref.torch.diagnostics import principal_angles

    even, odd = (g.double() for g in stats.halves(name))
    A = [lora_one_subspace(-g, RANK) for g in (even, odd)]  # (d_in, r) each
    angles = principal_angles(A[0], A[1])
    omega2 = -odd @ odd.mT  # (d_in, d_in)
    regret = float(torch.trace(A[0].mT @ omega2 @ A[0]) - torch.trace(A[1].mT @ omega2 @ A[1]))
    return {
        **dict.fromkeys(METRICS, math.nan),
        "split_angle_max": float(angles.max()),
        "split_angle_min": float(angles.min()),
        "split_mean_cos2": float(torch.cos(angles).square().mean()),
        "split_rel_regret": regret / (RANK * float(torch.linalg.svdvals(odd)[0]) ** 2),
        "snr_split": split_snr_of(even, odd, stats.split_weights),
    }


def half_omegas(stats: Any, name: str, config: Any, J: Any, bias: str) -> list[torch.Tensor]:
    """Ω of the even and of the odd half of layer ``name`` (shared Fisher ``J``), float64.

    ``bias="delta"``: LoRA-DA's, as ``calibration_diagnostics`` builds them (``ΔŴ_h = −Ĵ⁻¹Ĝ_h``,
    the configured estimator at the half's |S|, no σ-normalisation: it scales Ω by 1/σ_h²).
    ``bias="matched"``: ``Ω_h = β/(N σ(ΔŴ_h)²)·Σ_i Ĵ⁻¹_[i] − α ĝ_h ĝ_hᵀ`` with
    ``ĝ_h = −Ĝ_h/σ(Ĝ_h)``: the σ-normalised Ω of LoRA-DA with its bias direction ``ΔŴ_h/σ(ΔŴ_h)``
    replaced by ``−Ĝ_h/σ(Ĝ_h)``, everything else equal (so with ``Ĵ ∝ I`` it is LoRA-DA's Ω);
    σ-normalised whatever ``config.normalize_delta`` says (that only scales Ω: same A).
    ``bias="literal"``: ``−Ĝ_h`` through LoRA-DA's own code path (Ω = β/N·Σ_i Ĵ⁻¹_[i] − α Ĝ_hĜ_hᵀ
    up to 1/σ², i.e. the variance coefficient divided by σ(Ĝ_h)²)."""
    from lora_da_ref.torch.diagnostics import plug_in_sample_size
    from lora_da_ref.torch.guidance import (
        estimator_weights,
        fisher_gradient,
        guidance_from_delta,
        guidance_matrix,
        top_singular_value,
    )

    if bias not in ("delta", "matched", "literal"):
        raise ValueError(f"bias must be 'delta', 'matched' or 'literal', got {bias!r}")
    w1, w2 = stats.split_weights
    size = plug_in_sample_size(stats)
    plain = config.replace(normalize_delta=False)
    omegas = []
    for g, w in zip(stats.halves(name), (w1, w2)):
        g = g.to(torch.float64)
        size_h = size * w / (w1 + w2)  # a half's |S| scales with its gradient weight
        delta = fisher_gradient(J, g)  # ΔŴ_h (d_in, d_out)
        if bias == "delta":
            omegas.append(guidance_from_delta(J, delta, plain, name, size_h).omega)
        elif bias == "literal":
            omegas.append(guidance_from_delta(J, -g, plain, name, size_h).omega)
        else:
            beta, alpha = estimator_weights(J, delta, config, size_h)
            direction = -g / top_singular_value(g, name)  # ĝ_h, σ(ĝ_h) = 1
            coefficient = beta / top_singular_value(delta, name) ** 2  # β/σ(ΔŴ_h)², times 1/N
            omegas.append(
                guidance_matrix(
                    J, direction, config.n_train, variance_weight=coefficient, bias_weight=alpha
                )
            )
    return omegas


def split_half_stability(
    omegas: list[torch.Tensor], name: str, config: Any
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The split-half metrics of two halves' Ω, as ``calibration_diagnostics`` measures them
    (the config's solver and per-layer seed, regret of half 1's A under half 2's Ω relative to
    ``r‖Ω₂‖₂``), and the two A (d, r)."""
    from lora_da_ref.torch.diagnostics import power_spectral_norm, principal_angles
    from lora_da_ref.torch.solvers import layer_seed, smallest_eigenpairs

    options = {"seed": layer_seed(config.seed, name), **config.solver_options}
    A = [
        smallest_eigenpairs(omega, config.rank, solver=config.solver, **options).vectors.to(
            torch.float64
        )
        for omega in omegas
    ]
    angles = principal_angles(A[0], A[1])
    omega2 = omegas[1].to(torch.float64)
    regret = float(torch.trace(A[0].mT @ omega2 @ A[0]) - torch.trace(A[1].mT @ omega2 @ A[1]))
    scale = config.rank * power_spectral_norm(omega2)  # the diagnostics' own scale
    metrics = {
        "split_angle_max": float(angles.max()),
        "split_angle_min": float(angles.min()),
        "split_mean_cos2": float(torch.cos(angles).square().mean()),
        "split_rel_regret": regret / scale if scale > 0 else math.nan,
    }
    return metrics, A


def z_spectrum(stats: Any, name: str) -> torch.Tensor:
    """Eigenvalues of the layer's (undamped) Z, float64, ascending."""
    return torch.linalg.eigvalsh(stats.Z[stats.group_of[name]].to(torch.float64))


def variance_bias_ratio(
    stats: Any, name: str, config: Any, J: Any, direction: torch.Tensor, z_eigs: torch.Tensor
) -> float:
    """‖variance term‖₂ / ‖bias term‖₂ of the whole set's Ω with bias direction ``direction``
    (unnormalised; σ-normalisation scales both terms alike):
    ``β_eff·tr((Y+λ)⁻¹)/(λ_min(Z)+λ_Z) / (N·|α_eff|·σ(direction)²)``."""
    from lora_da_ref.torch.diagnostics import plug_in_sample_size
    from lora_da_ref.torch.guidance import estimator_weights, top_singular_value

    delta = direction.to(torch.float64)
    beta, alpha = estimator_weights(J, delta, config, plug_in_sample_size(stats))
    variance = (
        beta / config.n_train * float(J.y_inverse_trace()) / float(z_eigs[0] + J.damping["Z"])
    )
    bias = abs(alpha) * top_singular_value(delta, name) ** 2
    return variance / bias if bias > 0 else math.inf


def sandwich_snr(stats: Any, name: str, J: Any, delta_sq: float, z_eigs: torch.Tensor) -> float:
    """The plug-in SNR with the noise the damped estimator ``−(Z+λ)⁻¹Ĝ(Y+λ)⁻¹`` has when
    ``Cov(vec Ĝ) = (Y ⊗ Z)/|S|``: ``tr((Y+λ)⁻¹Y(Y+λ)⁻¹)·tr((Z+λ)⁻¹Z(Z+λ)⁻¹)/|S|``; NaN for a
    full Y (only the diagonal output factor is computed here)."""
    from lora_da_ref.torch.diagnostics import plug_in_sample_size

    y = stats.Y[name].to(torch.float64)
    if y.ndim != 1:
        return math.nan
    y_part = float((y / (y + J.damping["Y"]).square()).sum())
    z = z_eigs.clamp_min(0)
    z_part = float((z / (z + J.damping["Z"]).square()).sum())
    noise = y_part * z_part / plug_in_sample_size(stats)
    return (delta_sq - noise) / noise if noise > 0 else math.inf


def lora_da_split(
    stats: Any, name: str, config: Any, z_eigs: torch.Tensor
) -> tuple[dict[str, float], Any]:
    """A preset's split-half metrics and SNRs (``calibration_diagnostics``, ``"full"`` tier), and
    its Fisher (``None`` when it cannot be built)."""
    from lora_da_ref.torch.diagnostics import calibration_diagnostics
    from lora_da_ref.torch.factors import kfac_fisher
    from lora_da_ref.torch.guidance import fisher_gradient

    try:
        J = kfac_fisher(stats, name, config)
    except ValueError:  # absolute damping and a singular Z (fewer tokens than inputs): no solve
        return dict.fromkeys(METRICS, math.nan), None
    delta = fisher_gradient(J, stats.G[name].to(torch.float64))
    d = calibration_diagnostics(stats, name, config, J, delta)
    row = {
        **{k: d[k] for k in STABILITY},
        "snr_plugin": d["calibration_snr"],
        "snr_split": d.get("split_snr", math.nan),
        "snr_sandwich": sandwich_snr(stats, name, J, d["delta_sq"], z_eigs),
        "var_bias_ratio": variance_bias_ratio(stats, name, config, J, delta, z_eigs),
    }
    return row, J


def ablation_split(
    stats: Any, name: str, config: Any, J: Any, bias: str, z_eigs: torch.Tensor
) -> dict[str, float]:
    """The −Ĝ ablation (:func:`half_omegas` ``bias``) of one layer: split-half metrics as
    LoRA-DA's, ``snr_split`` of Ĝ, ``var_bias_ratio`` of its whole-set Ω."""
    from lora_da_ref.torch.guidance import fisher_gradient

    metrics, _ = split_half_stability(half_omegas(stats, name, config, J, bias), name, config)
    G = stats.G[name].to(torch.float64)
    direction = -G if bias == "literal" else fisher_gradient(J, G)  # matched: ΔŴ's balance
    even, odd = (g.to(torch.float64) for g in stats.halves(name))
    return {
        **dict.fromkeys(METRICS, math.nan),
        **metrics,
        "snr_split": split_snr_of(even, odd, stats.split_weights),
        "var_bias_ratio": variance_bias_ratio(stats, name, config, J, direction, z_eigs),
    }


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
        spectra: dict[str, torch.Tensor] = {}  # Z's eigenvalues per group (shared inputs)
        for name, module in targets.items():
            group = stats.group_of[name]
            if group not in spectra:
                spectra[group] = z_spectrum(stats, name)
            base = {"n_calib": size, "layer": name, "d_in": module.in_features}
            fishers = {}
            for method, config in configs.items():
                row, fishers[method] = lora_da_split(stats, name, config, spectra[group])
                rows.append({**base, "method": method, **row})
            for method, bias in ABLATIONS.items():
                config, J = configs["lora_da_default"], fishers["lora_da_default"]
                row = ablation_split(stats, name, config, J, bias, spectra[group])
                rows.append({**base, "method": method, **row})
            rows.append(
                {**base, "method": "lora_one_subspace", **lora_one_subspace_split(stats, name)}
            )
    return rows


def spearman_within(rows: list[dict], x: str, y: str = "split_angle_max") -> dict[str, Any]:
    """Spearman ρ(x, y) within each |S| (``{str(|S|): {"rho", "layers"}}``) and pooled over the
    (layer, |S|) pairs (``"pooled_confounded"``: both move with |S|); NaN with < 3 finite pairs."""
    from scipy.stats import spearmanr

    def rho(sub: list[dict]) -> dict[str, Any]:
        ok = [r for r in sub if math.isfinite(r[x]) and math.isfinite(r[y])]
        value = (
            float(spearmanr([r[x] for r in ok], [r[y] for r in ok])[0]) if len(ok) > 2 else math.nan
        )
        return {"rho": value, "layers": len(ok)}

    sizes = sorted({r["n_calib"] for r in rows})
    return {
        "within_size": {str(s): rho([r for r in rows if r["n_calib"] == s]) for s in sizes},
        "pooled_confounded": rho(rows),
    }


def negative_fraction(values: list[float]) -> float:
    """The fraction of finite values below 0 (NaN when none is finite)."""
    ok = [v for v in values if not math.isnan(v)]
    return sum(v < 0 for v in ok) / len(ok) if ok else math.nan


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Medians per (method, |S|) (a metric the method does not have is left out), within-|S| and
    pooled Spearman ρ(SNR, largest angle) for every SNR a method has, the fraction of layers with
    a negative SNR, the determined |S|."""
    out: dict[str, Any] = {"determined_angle": DETERMINED_ANGLE, "methods": {}}
    sizes = sorted({r["n_calib"] for r in rows})
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        at = {s: [r for r in mine if r["n_calib"] == s] for s in sizes}
        med = {s: {k: _nanmedian([r[k] for r in at[s]]) for k in METRICS} for s in sizes}
        med = {s: {k: v for k, v in d.items() if not math.isnan(v)} for s, d in med.items()}
        snrs = [k for k in SNRS if any(not math.isnan(r[k]) for r in mine)]
        by_angle = [s for s in sizes if med[s]["split_angle_max"] < DETERMINED_ANGLE]
        by_cos2 = [s for s in sizes if med[s]["split_mean_cos2"] > 0.5]
        out["methods"][m] = {
            "median_by_size": {str(s): v for s, v in med.items()},
            "random_mean_cos2": float(np.median([RANK / r["d_in"] for r in mine])),
            "spearman_vs_angle_max": {k: spearman_within(mine, k) for k in snrs},
            "negative_snr_fraction": {
                k: {str(s): negative_fraction([r[k] for r in at[s]]) for s in sizes} for k in snrs
            },
            "determined_at": by_angle[0] if by_angle else None,
            "determined_at_cos2": by_cos2[0] if by_cos2 else None,
        }
    return out


def _nanmedian(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return float(np.median(ok)) if ok else math.nan


def draw(summary: dict) -> tuple[Any, list[Series]]:
    import matplotlib.pyplot as plt

    panels = {
        "split_angle_max": "median largest split-half angle (rad)",
        "split_mean_cos2": "median mean cos² of the angles",
        "split_rel_regret": "median relative regret",
        "snr_split": "median SNR: split-half (solid), plug-in (dashed)",
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    series = []
    for ax, (key, title) in zip(axes, panels.items()):
        keys = (key, "snr_plugin") if key == "snr_split" else (key,)
        for m, e in summary["methods"].items():
            for k in keys:
                xs = np.array([float(s) for s in e["median_by_size"]])
                ys = np.array([v.get(k, math.nan) for v in e["median_by_size"].values()])
                if not np.isfinite(ys).any():
                    continue  # no such SNR for this method (LoRA-One, the ablations: no plug-in)
                s = Series(k, m, xs, ys)
                style = {"ls": "--", "label": f"{m} (plug-in)"} if k == "snr_plugin" else {}
                marker = {"marker": MARKERS.get(m, "o"), "ms": 7}
                if m == "lora_da_debiased":
                    marker["mfc"] = "none"  # the default's circles show through
                plot_series(ax, s, color=COLORS[m], **marker, **style)
                series.append(s)
        if key == "split_mean_cos2":
            ref = next(iter(summary["methods"].values()))["random_mean_cos2"]
            ax.axhline(ref, color="gray", ls=":", label="random subspaces (r/d)")
        if key == "split_angle_max":
            ax.axhline(DETERMINED_ANGLE, color="gray", ls=":", label="π/4")
        if key == "snr_split":
            ax.set_yscale("symlog")
            ax.legend(fontsize=6)
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
    return ItemResult(png, csv_path, plotted, one_line(summary), (layers_csv, json_path))


def one_line(summary: dict) -> str:
    """The printed summary: per method the determined |S| and the within-|S| ρ of its
    split-half SNR against the largest angle."""
    parts = []
    for m, e in summary["methods"].items():
        rho = e["spearman_vs_angle_max"].get("snr_split", {}).get("within_size", {})
        values = "/".join(f"{v['rho']:+.2f}" for v in rho.values())
        parts.append(f"{m}: determined at {e['determined_at']}, ρ(split SNR, angle) {values}")
    return "real_regime " + ", ".join(parts)
