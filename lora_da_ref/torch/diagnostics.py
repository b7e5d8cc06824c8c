"""Per-layer calibration diagnostics: is LoRA-DA's subspace determined by this calibration set?

``ΔŴ = −Ĵ⁻¹Ĝ`` is estimated from a finite calibration
set, so ``E[ΔŴΔŴᵀ] ≈ ΔWΔWᵀ + Σ_i J⁻¹_[i]/|S|``: when the noise term is as large as the signal,
Ω's bias term is mostly noise and A0 is not a property of the task. Both diagnostics below come
from the statistics of the one pass (any ``config.diagnostics`` tier but ``"off"``: the pass
keeps the gradient sums of the even- and odd-numbered sequences apart; Z and Y are not split).
The SNRs are the ``"cheap"`` tier; the split-half solves (A0 of each half) the ``"full"`` one.

**Plug-in calibration SNR** ``= (‖ΔŴ‖²_F − noise) / noise`` with
``noise = tr(Σ_i Ĵ⁻¹_[i]) / |S| = tr((Y+λ)⁻¹) · tr((Z+λ)⁻¹) / |S|`` (K-FAC, damped as in the
solve; ΔŴ before any σ-normalisation). SNR < 1: the noise is more than half of ‖ΔŴ‖².

*Which |S|.* The noise of ``ΔŴ`` is ``Cov(vec ΔŴ) = Ĵ⁻¹ Cov(vec Ĝ) Ĵ⁻¹``, and the formula needs
``Cov(vec Ĝ) = Ĵ/|S|``: |S| is the number of independent units whose average is ``Ĝ`` **and**
whose second moment is ``Ĵ``. In this pass ``Ĝ = (1/W) Σ_t a_t`` sums per-position terms
``a_t = x_t s̃_tᵀ`` (``W`` = ``gradient_weight``: the loss tokens for ``gradient_weight="token"``,
the sequences for ``"sequence"``), and the K-FAC factors average the same terms' second moments
over the ``|P|`` statistics positions, ``Ĵ ≈ (1/|P|) Σ_t vec(a_t) vec(a_t)ᵀ``. If the per-position
terms are uncorrelated, ``Cov(vec Ĝ) = (1/W²) Σ_t vec(a_t)vec(a_t)ᵀ = (|P|/W²) Ĵ``, hence

    |S| = W² / |P|     (``sample_size``).

With the paper/default settings (token-mean loss, P = loss tokens) this is the **number of loss
tokens**; with the official settings (per-sequence mean losses, P = all attention positions) it
is ``sequences² / positions`` ≈ sequences / mean length (the per-sequence ``Ĵ`` is ~``1/T²``
smaller). It is *not* the number of sequences in the paper setting: ``Ĵ`` there is a per-token
Fisher. Tokens of one sequence are correlated, so the plug-in noise is a lower bound in spirit;
the split-half estimate below needs no independence assumption and is reported beside it.

**Split-half noise** ``= ‖ΔŴ₁ − ΔŴ₂‖²_F · w₁w₂/W²`` (``ΔŴ_h = −Ĵ⁻¹Ĝ_h``, ``w_h`` the halves'
gradient weights): ``Cov(Ĝ_h) ∝ 1/w_h`` for independent halves gives
``E‖ΔŴ₁ − ΔŴ₂‖² = (1/w₁ + 1/w₂)·c`` and ``E‖ΔŴ − ΔW‖² = c/W``. ``split_snr`` uses it.

**Split-half stability of A0**: A0 of each half (Ω from ``Ĝ_h`` with the shared ``Ĵ``, the
configured β, α, N, σ-normalisation and solver): the largest and smallest principal angles
between the two r-dimensional subspaces (radians; π/2 = orthogonal), the mean of their squared
cosines (``split_mean_cos2``: 1 = the same subspace, r/d on average for two random ones), and the regret of half 1's
A under half 2's Ω, ``tr(A₁ᵀΩ₂A₁) − tr(A₂ᵀΩ₂A₂)`` (Eq. 8; ≥ 0 up to the solver's accuracy),
also relative to ``r·‖Ω₂‖₂``. The halves' Ω omit the official σ-normalisation (``Ω/σ_h²``,
``normalize_delta``), which changes neither A nor the relative regret: ``split_regret`` is in
the units of the unnormalised Ω.
"""

from __future__ import annotations

import math
import statistics as pystats
import sys
from typing import Any, TextIO

import torch
from torch import Tensor

from lora_da_ref.snr import SNR_LIMIT, layer_snr
from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    SolveConfig,
    StatisticsConfig,
    rank_of,
)
from lora_da_ref.torch.fisher import FisherMatrix
from lora_da_ref.torch.guidance import calibration_noise, fisher_gradient, guidance_from_delta
from lora_da_ref.torch.solvers import layer_seed, smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACStatistics

__all__ = [
    "calibration_diagnostics",
    "calibration_summary",
    "fisher_units",
    "plug_in_sample_size",
    "power_spectral_norm",
    "principal_angles",
    "report_calibration",
]


def plug_in_sample_size(stats: KFACStatistics) -> float:
    """``|S| = W²/|P|`` (module docstring): loss tokens in the paper/default settings."""
    if stats.tokens <= 0 or stats.gradient_weight <= 0:
        return math.nan
    return stats.gradient_weight**2 / stats.tokens


def fisher_units(
    config: StatisticsConfig | LoraDAConfig,
    *,
    sequences: int,
    loss_tokens: int,
    attention_tokens: int,
) -> float:
    """A data set's size in the units of the Fisher the statistics estimate: ``W²/|P|``, as
    :func:`plug_in_sample_size` for the calibration set (module docstring, "Which |S|").

    ``W`` is the set's gradient weight (its loss tokens for ``gradient_weight="token"``, its
    sequences for ``"sequence"``) and ``|P|`` its statistics positions (loss tokens for
    ``token_mask="labels"``, every attention position for ``"attention"``). Pass the
    fine-tuning set's counts to get ``LoraDAConfig.n_train``: then ``N`` and ``|S|`` are in the
    same units, and the debiased factor ``1 + N/|S|`` is the ratio of the two sets' sizes. For
    the per-token settings of ``paper_literal`` this is the number of loss tokens; for the
    official per-sequence settings it is ``sequences² / positions`` (≈ sequences / mean length:
    the per-sequence-mean score makes the per-position Fisher ``~1/T`` of a sequence's)."""
    for name, value in (("sequences", sequences), ("loss_tokens", loss_tokens),
                        ("attention_tokens", attention_tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    weight = loss_tokens if config.gradient_weight == "token" else sequences
    positions = loss_tokens if config.token_mask == "labels" else attention_tokens
    return weight**2 / positions


def principal_angles(A1: Tensor, A2: Tensor) -> Tensor:
    """Principal angles (ascending, radians) between the column spaces of A1 and A2 (d, r), in
    float64, accurate for small angles too.

    ``arccos`` of the cosines (singular values of ``Q1ᵀQ2``) cannot resolve angles below
    ``√(2·eps) ≈ 2.1e-8`` (a cosine one ulp below 1); there the sines (singular values of
    ``Q2 − Q1Q1ᵀQ2``) are used instead, as ``scipy.linalg.subspace_angles`` does (Knyazev and
    Argentati, SIAM J. Sci. Comput. 23, 2002)."""
    Q1 = torch.linalg.qr(A1.to(torch.float64))[0]
    Q2 = torch.linalg.qr(A2.to(torch.float64))[0]
    M = Q1.mT @ Q2  # (r1, r2)
    cos = torch.linalg.svdvals(M).clamp(-1.0, 1.0)  # descending: angles ascending
    sin = torch.linalg.svdvals(Q2 - Q1 @ M).clamp(-1.0, 1.0).flip(0)  # ascending
    k = min(cos.shape[0], sin.shape[0])
    cos, sin = cos[:k], sin[:k]
    return torch.where(cos * cos < 0.5, torch.arccos(cos), torch.arcsin(sin))


def calibration_diagnostics(
    stats: KFACStatistics,
    name: str,
    config: SolveConfig | LoraDAConfig,
    J: FisherMatrix,
    delta: Tensor | None = None,
    *,
    split_solves: bool = True,
    rank: int | None = None,
) -> dict[str, Any]:
    """SNR and split-half stability of layer ``name`` (module docstring), from the pass's
    statistics and the layer's (damped) K-FAC Fisher ``J``; ``delta``: the unnormalised
    ``ΔŴ = −Ĵ⁻¹Ĝ`` when the caller has it (the solve does), else it is solved here. Keys:
    ``calibration_snr``, ``calibration_noise``, ``delta_sq``, ``sample_size``, and when both
    halves have data ``split_noise``, ``split_snr``; with ``split_solves`` also
    ``split_angle_max``, ``split_angle_min``, ``split_mean_cos2``, ``split_regret``,
    ``split_rel_regret``.

    Cost: the trace of the block sum (the solve's Ω holds it), and one Fisher solve for the odd
    half (ΔŴ is linear in Ĝ, so the even half's is ``(W·ΔŴ − w_odd·ΔŴ_odd)/w_even``); with
    ``split_solves`` two Ω and two eigen-solves (the ``"full"`` diagnostics tier)."""
    dtype = torch.float64
    if delta is None:
        delta = fisher_gradient(J, stats.G[name].to(dtype))  # (d_in, d_out), unnormalised ΔŴ
    delta = delta.to(dtype)
    delta_sq = float((delta * delta).sum())
    size = plug_in_sample_size(stats)
    noise = calibration_noise(J, size)
    out: dict[str, Any] = {
        "delta_sq": delta_sq,
        "sample_size": size,
        "calibration_noise": noise,
        "calibration_snr": _snr(delta_sq, noise),
    }
    if name not in stats.G_split:
        return out
    w1, w2 = stats.split_weights  # (even, odd)
    odd = fisher_gradient(J, stats.G_split[name].to(dtype))  # ΔŴ of the odd half
    even = (delta * (w1 + w2) - odd * w2) / w1  # ΔŴ is linear in Ĝ (= ΔŴ of the even half)
    diff = even - odd
    split_noise = float((diff * diff).sum()) * w1 * w2 / (w1 + w2) ** 2
    out |= {"split_noise": split_noise, "split_snr": _snr(delta_sq, split_noise)}
    if not split_solves:
        return out
    # each half's Ω with the configured estimator; a half's |S| scales with its gradient weight.
    # Without the σ-normalisation: it divides Ω by σ_h², which moves neither A nor the relative
    # regret, and σ_h (a Gram eigen-solve) would cost as much as the half's Ω.
    plain = config.replace(normalize_delta=False)
    guides = [
        guidance_from_delta(J, d, plain, name, size * w / (w1 + w2))
        for d, w in ((even, w1), (odd, w2))
    ]
    out |= _stability([g.omega for g in guides], name, config, rank_of(config, rank))
    return out


def _snr(signal: float, noise: float) -> float:
    if not noise > 0:
        return math.inf
    return (signal - noise) / noise


def _stability(
    omegas: list[Tensor], name: str, config: SolveConfig | LoraDAConfig, rank: int
) -> dict[str, float]:
    options = {"seed": layer_seed(config.seed, name), **config.solver_options}
    A = []
    for omega in omegas:
        eig = smallest_eigenpairs(omega, rank, solver=config.solver, **options)
        A.append(eig.vectors.to(torch.float64))
    angles = principal_angles(A[0], A[1])
    omega2 = omegas[1].to(torch.float64)
    regret = float(torch.trace(A[0].mT @ omega2 @ A[0]) - torch.trace(A[1].mT @ omega2 @ A[1]))
    scale = rank * power_spectral_norm(omega2)
    return {
        "split_angle_max": float(angles.max()),
        "split_angle_min": float(angles.min()),
        "split_mean_cos2": float(torch.cos(angles).square().mean()),  # random subspaces: r/d
        "split_regret": regret,
        "split_rel_regret": regret / scale if scale > 0 else math.nan,
    }


def power_spectral_norm(M: Tensor, iterations: int = 30) -> float:
    """max |λ| of a symmetric M by power iteration (a scale for the regret, not a result)."""
    gen = torch.Generator(device=M.device).manual_seed(0)
    v = torch.randn(M.shape[0], dtype=M.dtype, device=M.device, generator=gen)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = M @ v
        value = float(w.norm())
        if value == 0.0:
            return 0.0
        v = w / value
    return value


def calibration_summary(factors: dict[str, LoraFactors]) -> str | None:
    """One line: how many layers have an SNR (:func:`lora_da_ref.snr.layer_snr`: split-half where
    recorded) below 1, with the medians; ``None`` without data. Information, not a failure."""
    snr = {n: layer_snr(f.diagnostics) for n, f in factors.items()}
    snr = {n: s for n, s in snr.items() if s is not None}
    if not snr:
        return None
    low = [n for n, s in snr.items() if s < SNR_LIMIT]
    angles = [
        f.diagnostics["split_angle_max"]
        for f in factors.values()
        if "split_angle_max" in f.diagnostics
    ]
    parts = [f"median SNR {pystats.median(snr.values()):.3g}"]
    if angles:
        parts.append(f"median split-half angle {pystats.median(angles):.2f} rad")
    line = (
        f"LoRA-DA calibration: {len(low)} of {len(snr)} layers have SNR < 1 ({', '.join(parts)}; "
        "SNR = (‖ΔŴ‖² − noise)/noise, 0 = as much noise as signal)"
    )
    if low:
        line += (
            ": this calibration set does not determine LoRA-DA's subspace in those layers; "
            "more calibration samples lower the noise as 1/|S|"
        )
    return line


def report_calibration(factors: dict[str, LoraFactors], file: TextIO | None = None) -> None:
    """Print :func:`calibration_summary` (to stderr by default)."""
    line = calibration_summary(factors)
    if line is not None:
        print(line, file=sys.stderr if file is None else file)
