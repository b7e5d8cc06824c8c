"""Per-layer calibration diagnostics (docs/numerics.md, "Calibration diagnostics"): split-half
gradient sums from the one pass, plug-in calibration SNR against Monte-Carlo truth, split-half
stability of A0, summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lora_da_ref.torch import (
    KFACStatistics,
    LoraDAConfig,
    collect_statistics,
    find_target_modules,
    init_lora_da,
)
from lora_da_ref.torch.diagnostics import (
    calibration_diagnostics,
    calibration_summary,
    plug_in_sample_size,
    principal_angles,
)
from lora_da_ref.torch.factors import kfac_fisher, solve_layer
from tests.torch_cases import (  # noqa: F401
    LLAMA_TARGETS,
    llama_batches,
    single_thread,
    tiny_llama,
)

# HF's attention runs softmax in float32 even in a float64 model, so regrouping sequences into
# batches changes G at float32 round-off (measured 9e-8 relative); a wrong split is O(1).
BATCHING_RTOL = 1e-6


def _split(batches, batch_size: int):
    """The same sequences regrouped into batches of ``batch_size``."""
    rows = [
        {k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))
    ]
    return [
        {k: torch.cat([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
        for i in range(0, len(rows), batch_size)
    ]


@pytest.mark.parametrize("gradient_weight", ["token", "sequence"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_split_halves_are_the_even_and_odd_sequences(gradient_weight, batch_size):
    """stats.halves() == the G of a pass over the even-numbered / odd-numbered sequences alone,
    whatever the batch grouping; their weighted mean is G."""
    model = tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig(rank=2, dtype=torch.float64, gradient_weight=gradient_weight)
    targets = find_target_modules(model, LLAMA_TARGETS)
    sequences = _split(llama_batches(n_batches=3, batch=2), 1)  # 6 sequences
    stats = collect_statistics(model, _split(sequences, batch_size), targets, cfg, progress=False)
    even = collect_statistics(model, sequences[0::2], targets, cfg, progress=False)
    odd = collect_statistics(model, sequences[1::2], targets, cfg, progress=False)
    assert stats.split_weights == (even.gradient_weight, odd.gradient_weight)
    for n in targets:
        g_even, g_odd = stats.halves(n)
        for got, ref in ((g_even, even.G[n]), (g_odd, odd.G[n])):
            assert float((got - ref).norm() / ref.norm()) < BATCHING_RTOL
    off = collect_statistics(
        model,
        _split(sequences, batch_size),
        targets,
        cfg.replace(diagnostics="off"),
        progress=False,
    )
    for n in targets:
        assert float((stats.G[n] - off.G[n]).norm() / off.G[n].norm()) < 1e-12
    assert off.halves(n) is None


# ----------------------------------------------------------------------------- plug-in SNR


class _LinearTokens(nn.Module):
    """o_t = Wᵀ x_t for every token; loss = mean over tokens of ½‖o_t − y_t‖²."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(W.shape[0], W.shape[1], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.layer.weight.copy_(W.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _squared_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum(-1).mean()


def _draw(gen, W_star, n_batches=4, rows=4, seq=8, noise=0.5):
    d_in = W_star.shape[0]
    out = []
    for _ in range(n_batches):
        x = torch.randn(rows, seq, d_in, generator=gen, dtype=torch.float64)
        y = x @ W_star + noise * torch.randn(
            rows, seq, W_star.shape[1], generator=gen, dtype=torch.float64
        )
        out.append({"x": x, "y": y, "attention_mask": torch.ones(rows, seq)})
    return out


def test_plug_in_noise_matches_monte_carlo_over_calibration_draws():
    """Linear-Gaussian tokens at W0 = W* (ΔW = 0, K-FAC exact, tokens independent): over fresh
    calibration draws E‖ΔŴ‖² = noise = tr(Σ_i J⁻¹_[i])/|S| with |S| = loss tokens; the split-half
    noise has the same mean. A broken |S| (sequences instead of tokens: ×8 here) or tr(J) in place
    of tr(J⁻¹) fails."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 4, 3
    W_star = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64)
    model = _LinearTokens(W_star)
    cfg = LoraDAConfig.paper_literal(
        rank=1, dtype=torch.float64, target_modules=["layer"], label_shift=0, damping=0.0
    )
    targets = find_target_modules(model, ["layer"])
    delta_sq, noise, split = [], [], []
    for _ in range(200):
        stats = collect_statistics(
            model, _draw(gen, W_star), targets, cfg, loss_fn=_squared_loss, progress=False
        )
        assert plug_in_sample_size(stats) == stats.loss_tokens == 128
        d = calibration_diagnostics(stats, "layer", cfg, kfac_fisher(stats, "layer", cfg))
        delta_sq.append(d["delta_sq"])
        noise.append(d["calibration_noise"])
        split.append(d["split_noise"])
    t = torch.tensor(delta_sq)
    mean, se = float(t.mean()), float(t.std() / math.sqrt(len(t)))
    # Ẑ⁻¹ of n = 128 samples is biased up by ≈ n/(n − d_in − 1) = 1.04 in both; 4 s.e. ≈ 12 %.
    assert abs(mean - float(torch.tensor(noise).mean())) < 4 * se + 0.05 * mean
    assert abs(float(torch.tensor(split).mean()) - mean) < 4 * se * 1.5 + 0.05 * mean


def test_snr_is_large_when_the_shift_dominates_and_small_when_it_is_noise():
    """W0 = W* (ΔW = 0): SNR ≈ 0 (< 1); W0 = W* + D, D ~ 0.3·N(0, 1) entries, 512 tokens: the
    shift is ≈ 70× the noise (the empirical Fisher's Y grows with the residual, so a larger D
    does not help), SNR > 10 by the plug-in and the split-half noise."""
    gen = torch.Generator().manual_seed(1)
    W_star = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    D = 0.3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    cfg = LoraDAConfig.paper_literal(
        rank=1, dtype=torch.float64, target_modules=["layer"], label_shift=0, damping=0.0
    )
    for shift, check in ((0.0, lambda s: s < 1), (1.0, lambda s: s > 10)):
        model = _LinearTokens(W_star + shift * D)
        targets = find_target_modules(model, ["layer"])
        batches = _draw(gen, W_star, n_batches=16)
        stats = collect_statistics(
            model, batches, targets, cfg, loss_fn=_squared_loss, progress=False
        )
        d = calibration_diagnostics(stats, "layer", cfg, kfac_fisher(stats, "layer", cfg))
        assert check(d["calibration_snr"]) and check(d["split_snr"]), (shift, d)


# ----------------------------------------------------------------------------- stability


def test_identical_halves_give_zero_angle_and_regret():
    """Each sequence twice in a row (stream 2k and 2k+1 equal): both halves have the same G,
    so their A0 coincide (angles 0, regret 0, split noise 0)."""
    model = tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig.paper_literal(rank=2, dtype=torch.float64)
    targets = find_target_modules(model, LLAMA_TARGETS)
    rows = _split(llama_batches(n_batches=2, batch=2), 1)
    doubled = [r for r in rows for _ in range(2)]
    stats = collect_statistics(model, _split(doubled, 2), targets, cfg, progress=False)
    for n in list(targets)[:4]:
        d = calibration_diagnostics(stats, n, cfg, kfac_fisher(stats, n, cfg))
        assert d["split_angle_max"] < 1e-6 and abs(d["split_rel_regret"]) < 1e-10, (n, d)
        assert d["split_noise"] < 1e-20 * d["delta_sq"]


def test_different_halves_give_angles_and_nonnegative_regret():
    model = tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig.paper_literal(rank=2, dtype=torch.float64)
    targets = find_target_modules(model, LLAMA_TARGETS)
    stats = collect_statistics(model, llama_batches(), targets, cfg, progress=False)
    for n in list(targets)[:4]:
        d = calibration_diagnostics(stats, n, cfg, kfac_fisher(stats, n, cfg))
        assert 0 <= d["split_angle_min"] <= d["split_angle_max"] <= math.pi / 2 + 1e-12
        assert d["split_angle_max"] > 1e-3
        assert d["split_regret"] >= -1e-9 * abs(d["split_regret"]) - 1e-12  # eigh: exact optimum


@pytest.mark.parametrize(
    ("preset", "solver", "tol"),
    [
        ("official", "eigh", 1e-8),
        ("paper_literal", "eigh", 1e-8),
        # 10 unconverged LOBPCG steps amplify round-off: 1.1e-7 measured before σ was skipped
        # (the even half's ΔŴ comes from the linearity identity), 4e-8 after
        ("official", None, 1e-6),
    ],
)
def test_split_angles_equal_those_of_two_full_solves_of_the_halves(preset, solver, tol):
    """The split-half angles and relative regret equal those of two ordinary solves
    (:func:`solve_layer`, σ-normalisation included for the official preset), one per half's G
    with the shared Z and Y. The diagnostics skip σ (Ω/σ² has the same eigenvectors); a wrong
    half (the even ΔŴ from the linearity identity) or a σ that changes the eigenvectors (β/σ
    instead of β/σ²) breaks the equality."""
    model = tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig.preset(preset, rank=2, dtype=torch.float64, n_train=100)
    if solver is not None:
        cfg = cfg.replace(solver=solver, solver_options={})
    targets = find_target_modules(model, LLAMA_TARGETS)
    stats = collect_statistics(model, llama_batches(), targets, cfg, progress=False)
    quiet = cfg.replace(diagnostics="off")
    checked = 0
    for n in list(targets)[:5]:
        d = calibration_diagnostics(stats, n, cfg, kfac_fisher(stats, n, cfg))
        halves = []
        for g in stats.halves(n):
            half = KFACStatistics(
                stats.Z, stats.Y, {n: g}, stats.group_of,
                stats.tokens, stats.loss_tokens, stats.sequences, stats.batches,
            )  # fmt: skip
            halves.append(solve_layer(half, n, quiet))
        A1, A2 = (h.eig.vectors for h in halves)
        omega2 = halves[1].omega
        angles = principal_angles(A1, A2)
        regret = float(torch.trace(A1.mT @ omega2 @ A1) - torch.trace(A2.mT @ omega2 @ A2))
        rel = regret / (cfg.rank * float(torch.linalg.matrix_norm(omega2, ord=2)))
        assert abs(d["split_angle_max"] - float(angles.max())) < tol, (n, d, angles)
        assert abs(d["split_angle_min"] - float(angles.min())) < tol, (n, d, angles)
        # the diagnostics' scale r‖Ω₂‖₂ is 30 power-iteration steps (5e-7 relative here)
        assert abs(d["split_rel_regret"] - rel) < 1e-4 * abs(rel) + tol, (n, d, rel)
        checked += d["split_angle_max"] > 1e-3  # the halves differ: not a vacuous equality
    assert checked >= 3


def test_principal_angles_known_values():
    e = torch.eye(4, dtype=torch.float64)
    a = principal_angles(e[:, :2], torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / math.sqrt(2)], 1))
    assert torch.allclose(a, torch.tensor([0.0, math.pi / 4], dtype=torch.float64), atol=1e-7)


# ----------------------------------------------------------------------------- end to end


def test_init_reports_diagnostics_per_layer_and_a_summary(capsys):
    model = tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig.paper_literal(rank=2, dtype=torch.float64, n_train=100)
    factors = init_lora_da(model, llama_batches(), cfg.replace(diagnostics="full"), progress=True)
    keys = {"calibration_snr", "calibration_noise", "split_snr", "split_angle_max", "split_regret"}
    assert all(keys <= f.diagnostics.keys() for f in factors.values())
    # the one SNR a user reads is the split-half one where recorded (lora_da_ref.snr); here it
    # counts 14 layers below 1 where the plug-in counts 7: the test tells the two apart
    low = sum(f.diagnostics["split_snr"] < 1 for f in factors.values())
    assert low != sum(f.diagnostics["calibration_snr"] < 1 for f in factors.values())
    line = f"{low} of {len(factors)} layers have SNR < 1"
    assert line in calibration_summary(factors) and line in capsys.readouterr().err
    off = init_lora_da(model, llama_batches(), cfg.replace(diagnostics="off"), progress=False)
    assert "calibration_snr" not in next(iter(off.values())).diagnostics
    for n in factors:  # the diagnostics do not change the result
        assert torch.equal(factors[n].A, off[n].A) or torch.allclose(
            factors[n].A, off[n].A, atol=1e-6
        )


# ----------------------------------------------------------------------------- estimator variants


@pytest.mark.parametrize("estimator", ["debiased", "damped"])
def test_torch_estimators_match_the_numpy_registry(estimator):
    """``LoraDAConfig(estimator=...)`` against ``lora_da_debiased`` / ``lora_da_damped`` of the
    NumPy reference on a K-FAC-exact layer (dense J = Y ⊗ Z, no damping, |S| = W²/|P| = 300):
    the same Ω up to rounding, so the same A0 and A0ᵀΔW. The case sits at SNR̂ ≈ 2, where the
    variants' A0 differ from the plug-in's by > 0.02 rad (checked; 0.057 rad for "damped"), so
    N/|S| inverted, a missing 1/|S| or a wrong trace moves A0 by far more than 1e-8."""
    from lora_da_ref import InitProblem, initialize
    from lora_da_ref.torch.factors import solve_layer

    rng = np.random.default_rng(3)
    d1, d2, size, n, r = 10, 4, 300, 1000, 2
    Z = _spd(rng, d1)
    Y = _spd(rng, d2)
    # G = −Z ΔW Y with ‖ΔW‖² ≈ 2·tr(Σ_i J⁻¹_[i])/|S| (SNR̂ ≈ 2)
    noise = np.trace(np.linalg.inv(Y)) * np.trace(np.linalg.inv(Z)) / size
    delta = rng.standard_normal((d1, d2)) * np.sqrt(2 * noise / (d1 * d2))
    G = -Z @ delta @ Y
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    stats = KFACStatistics({"g": t(Z)}, {"m": t(Y)}, {"m": t(G)}, {"m": "g"}, size, size, 1, 1,
                           gradient_weight=float(size))  # fmt: skip
    base = dict(rank=r, n_train=n, dtype=torch.float64, damping=0.0, damping_scale="absolute",
                diagnostics="off")  # fmt: skip
    ours = solve_layer(stats, "m", LoraDAConfig.paper_literal(**base, estimator=estimator))
    plugin = solve_layer(stats, "m", LoraDAConfig.paper_literal(**base))
    problem = InitProblem(W0=np.zeros((d1, d2)), G=G, J=np.kron(Y, Z), n=n, n_calib=size)
    A_ref, B_ref = initialize(f"lora_da_{estimator}", problem, r)
    assert float(principal_angles(ours.A, t(A_ref)).max()) < 1e-8
    np.testing.assert_allclose((ours.A @ ours.B).numpy(), A_ref @ B_ref, rtol=0, atol=1e-10)
    assert float(principal_angles(ours.A, plugin.A).max()) > 0.02  # the variant matters here


def _spd(rng, d):
    X = rng.standard_normal((d, 3 * d))
    return X @ X.T / (3 * d) + 0.1 * np.eye(d)


def test_estimators_need_a_sample_size():
    from lora_da_ref.torch.factors import kfac_fisher
    from lora_da_ref.torch.guidance import estimator_weights

    stats = KFACStatistics({"g": torch.eye(3)}, {"m": torch.eye(2)}, {"m": torch.ones(3, 2)},
                           {"m": "g"}, 5, 5, 1, 1, gradient_weight=0.0)  # fmt: skip
    config = LoraDAConfig(rank=1, estimator="debiased", dtype=torch.float64)
    J = kfac_fisher(stats, "m", config)
    with pytest.raises(ValueError, match="needs the calibration sample size"):
        estimator_weights(J, torch.ones(3, 2, dtype=torch.float64), config, None)


@pytest.mark.parametrize("preset", ["default", "paper_literal"])
def test_fisher_units_put_n_train_in_the_units_of_the_calibration_size(preset):
    """The fine-tuning set's size in the Fisher's units (fisher_units) equals |S| of the same
    sequences' statistics (plug_in_sample_size): the calibration set taken as its own training
    set has N/|S| = 1, so the debiased factor 1 + N/|S| = 2. Counting N in sequences (the old
    benchmark's units) is off by the mean sequence length in both presets."""
    from lora_da_ref.torch.diagnostics import fisher_units

    model = tiny_llama(dtype=torch.float64)
    batches = llama_batches()
    cfg = LoraDAConfig.preset(preset, rank=2, dtype=torch.float64)
    targets = find_target_modules(model, LLAMA_TARGETS)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    sequences = sum(int(b["input_ids"].shape[0]) for b in batches)
    attention = sum(int(b["attention_mask"].sum()) for b in batches)
    loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n = fisher_units(cfg, sequences=sequences, loss_tokens=loss, attention_tokens=attention)
    size = plug_in_sample_size(stats)
    assert n == pytest.approx(size, rel=1e-12)
    assert abs(sequences / size - 1) > 0.5  # the sequence count is not in these units
