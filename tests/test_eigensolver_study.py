"""The eigensolver study (benchmarks/eigensolver_study.py) on small cases, and the accuracy of the
eigensolve that ``LoraDAConfig()``'s defaults actually run.

The default path must meet 1e-3 rad: tested end to end through ``init_lora_da`` (statistics,
damping, Fisher, Ω, the default solver and its options) on a layer whose Ω is known in closed form,
with float32 and float64 statistics. The official 10-iteration LOBPCG is measured (its misses are
reported by the study, not asserted away).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lora_da_ref.torch import LoraDAConfig, init_lora_da

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "eigensolver_study.py"
_SPEC = importlib.util.spec_from_file_location("eigensolver_study", _PATH)
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

D_OUT = 8  # ≥ r = 8


def closed_form_layer(d: int, gap: float, r: int = study.RANK, seed: int = 0):
    """A bias-free ``nn.Linear(d, D_OUT)`` and one batch whose statistics are known exactly.

    Factorial design: every input ``±√(d z_k) q_k`` (Q Haar, k = 1…d) meets every output score
    ``±√D_OUT e_j`` (loss ``Σ_t s_tᵀ o_t``, so ``∂ℓ_t/∂o_t = s_t``). Then ``Z = Q diag(z) Qᵀ``,
    ``Y = I``, ``G = 0`` (± symmetry), so ``ΔW = 0`` and ``Ω = tr(Y_λ⁻¹)/N · Z_λ⁻¹`` with damped
    factors: the r smallest eigenvectors of Ω are the columns of Q with the r largest ``z``.
    ``z = 1/μ`` with μ the spectrum of the study (scaled into [1, 2]): relative gap ``gap`` after
    the r-th eigenvalue. Returns the model, the batches, the loss and the exact (d, r) subspace.
    """
    rng = np.random.default_rng([seed, d])
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))
    mu = 1.5 + 0.5 * np.concatenate(
        [np.linspace(-1.0, -0.5, r), np.linspace(-0.5 + 4 * gap, 1.0, d - r)]
    )  # Ω's eigenvalues up to a constant: relative gap (to ‖Ω‖₂ = 2) = `gap`
    z = 1.0 / mu
    X = np.sqrt(d * z)[:, None] * Q.T  # (d, d) rows √(d z_k) q_kᵀ
    S = np.sqrt(D_OUT) * np.eye(D_OUT)  # (D_OUT, D_OUT) rows √D_OUT e_jᵀ
    xs = np.concatenate([X, -X]).repeat(2 * D_OUT, axis=0)  # (4 d D_OUT, d)
    ss = np.tile(np.concatenate([S, -S]), (2 * d, 1))  # (4 d D_OUT, D_OUT)
    batch = {
        "x": torch.from_numpy(xs)[None],
        "s": torch.from_numpy(ss)[None],
        "attention_mask": torch.ones(1, xs.shape[0], dtype=torch.long),
    }
    model = nn.Sequential(nn.Linear(d, D_OUT, bias=False))

    def loss_fn(m: nn.Module, b) -> torch.Tensor:  # mean over tokens of s_tᵀ o_t
        x = b["x"].to(m[0].weight.dtype)
        return (m(x) * b["s"].to(x.dtype)).sum(-1).mean()

    return model, [batch], loss_fn, torch.from_numpy(Q[:, :r].copy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,gap", [(64, 1e-1), (64, 1e-3), (128, 1e-2)])
def test_default_config_meets_target(dtype, d, gap):
    model, batches, loss_fn, exact = closed_form_layer(d, gap)
    model = model.to(dtype)
    config = LoraDAConfig.paper_literal(rank=study.RANK, target_modules=("0",), dtype=dtype)
    factors = init_lora_da(model, batches, config, loss_fn=loss_fn, progress=False)["0"]
    angle = study.angle(factors.A, exact)
    assert angle <= study.TARGET_ANGLE, (angle, factors.diagnostics)


def test_closed_form_layer_is_what_it_claims():
    """The design's statistics: Z = Q diag(z) Qᵀ, Y = I, G = 0 (float64, round-off)."""
    from lora_da_ref.torch import collect_statistics, find_target_modules

    model, batches, loss_fn, exact = closed_form_layer(16, 1e-2)
    model = model.double()
    config = LoraDAConfig.paper_literal(rank=study.RANK, target_modules=("0",), dtype=torch.float64)
    targets = find_target_modules(model, config.target_modules)
    stats = collect_statistics(model, batches, targets, config, loss_fn=loss_fn, progress=False)
    Z, Y, G = stats.Z[stats.group_of["0"]], stats.Y["0"], stats.G["0"]
    assert torch.allclose(Y, torch.eye(D_OUT, dtype=torch.float64), atol=1e-12)
    assert float(G.abs().max()) <= 1e-14
    values, vectors = torch.linalg.eigh(Z)  # ascending: the r largest z are the last r
    assert study.angle(vectors[:, -study.RANK :], exact) <= 1e-8
    assert float(values[-study.RANK] / values[-study.RANK - 1]) > 1.0  # a real gap


@pytest.mark.parametrize("d,gap", [(64, 1e-1), (128, 1e-2)])
def test_study_trace_and_official_run_agree(d, gap):
    """The study's per-iteration trace and the official run agree on iteration 10 (same start,
    same Ω): the two measurements of the study are of the same solver."""
    omega, exact = study.synthetic_omega(d, gap)
    row = study.study_omega(omega, exact, max_iter=12)
    assert row["angle_at_10_float64"] == pytest.approx(row["official_float64"], rel=1e-3, abs=1e-9)


def test_synthetic_omega_has_the_requested_spectrum():
    omega, exact = study.synthetic_omega(32, 1e-2)
    values = torch.linalg.eigvalsh(omega)
    assert float(values[study.RANK] - values[study.RANK - 1]) == pytest.approx(1e-2, rel=1e-6)
    assert float(values.abs().max()) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(omega @ exact, exact * values[: study.RANK], atol=1e-12)


def test_study_detects_an_unconverged_solver():
    """Non-vacuity: with a small gap at d = 128 the official 10 iterations are far off."""
    omega, exact = study.synthetic_omega(128, 1e-3)
    row = study.study_omega(omega, exact, max_iter=12)
    assert row["official_float64"] > study.TARGET_ANGLE
    assert row["iters_to_1e-3_float64"] is None  # not within 12 iterations


# ----------------------------------------------------------------------------- --certified mode


def test_rescale_spectrum_keeps_the_ends_and_the_distribution():
    """Quantile rescaling keeps λ_min, λ_max, the order and the fraction below any level; the head
    variant keeps the smallest eigenvalues (hence the gap at r) exactly. Catches an interpolation
    on the wrong grid (clamped ends: repeated λ_min) or a head that is not kept."""
    lam = np.sort(np.random.default_rng(0).standard_normal(100) ** 3)
    for d in (100, 333, 1024):
        new = study.rescale_spectrum(lam, d)
        assert new.shape == (d,) and bool(np.all(np.diff(new) >= 0))
        assert new[0] == lam[0] and new[-1] == lam[-1] and new[1] > new[0]
        assert abs((new < 0).mean() - (lam < 0).mean()) <= 2 / 100
    head = study.rescale_spectrum(lam, 1024, head=study.HEAD)
    assert np.array_equal(head[: study.HEAD], lam[: study.HEAD]) and head[-1] == lam[-1]
    assert head.shape == (1024,) and bool(np.all(np.diff(head) >= 0))


def test_omega_with_spectrum_has_it():
    lam = study.rescale_spectrum(np.linspace(-1, 0.5, 50), 80)
    omega = study.omega_with_spectrum(lam)
    assert torch.allclose(torch.linalg.eigvalsh(omega), torch.from_numpy(lam), atol=1e-12)


def test_certified_case_row():
    """One row of ``--certified`` on the study's Ω (d = 256, gap 1e-2): the certified solver (with
    a budget that lets it finish) is within its certificate of eigh; the official 10 iterations
    are not within 1e-3 rad; times and counts are recorded."""
    omega, _ = study.synthetic_omega(256, 1e-2)
    row = study.certified_case(omega, max_matvecs=100_000)
    assert row["certified"] and row["fallback"] is None
    assert row["angle_certified"] <= row["certificate_rad"] <= study.TARGET_ANGLE
    assert row["angle_official"] > study.TARGET_ANGLE
    assert row["gap"] == pytest.approx(1e-2, rel=1e-6)
    assert row["iterations"] > 0 and row["matvecs"] >= row["iterations"] * study.RANK
    for key in ("time_eigh_s", "time_official_s", "time_certified_s"):
        assert row[key] > 0


def test_certified_mode_quick_runs(capsys):
    """``--certified --quick``: synthetic Ω at d = 256, no model needed, one JSON document."""
    assert study.main(["--certified", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["d"] for r in report["rows"]] == [256, 256]
    assert report["budget_fraction_of_eigh_flops"] == 0.2 and report["smollm2_sources"] == {}
    assert all(r["angle_certified"] <= study.TARGET_ANGLE for r in report["rows"])
