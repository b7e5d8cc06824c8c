"""paper_figs/real_regime.py: chunked statistics equal one pass; LoRA-One's subspace split is
right; the split-half harness measures as ``calibration_diagnostics`` does; the −Ĝ ablation builds
Ω from the gradient, not from ΔŴ; Spearman ρ within each |S| is not the pooled one; the
``--quick`` run on SmolLM2 writes its files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from paper_figs import real_regime as rr


@pytest.fixture(scope="module")
def tiny():
    from lora_da_ref.data import build_tiny_tokenizer, tiny_llama
    from lora_da_ref.real import gsm8k, tokenize_gsm8k

    model = tiny_llama(0, hidden=32, layers=2, heads=4).eval()
    tok = build_tiny_tokenizer()
    examples = [
        tokenize_gsm8k(tok, r, max_prompt_tokens=6, max_completion_tokens=6)
        for r in gsm8k("fit")[:8]
    ]
    return model, examples


def test_chunked_prefix_statistics_equal_one_pass(tiny):
    """Adding the chunks' sums is one pass over the prefix, halves included (even boundaries)."""
    from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules

    model, examples = tiny
    targets = find_target_modules(model, rr.PROJECTIONS)
    config = LoraDAConfig(rank=4, target_modules=rr.PROJECTIONS, diagnostics="full")
    got = dict(rr.prefix_statistics(model, examples, targets, config, (2, 4, 8)))
    for size in (4, 8):
        batches = [
            {k: e[k][None] for k in ("input_ids", "attention_mask", "labels")}
            for e in examples[:size]
        ]
        ref = collect_statistics(model, batches, targets, config, progress=False)
        assert (got[size].tokens, got[size].sequences) == (ref.tokens, ref.sequences)
        assert got[size].split_weights == pytest.approx(ref.split_weights)
        for name in targets:
            torch.testing.assert_close(got[size].G[name], ref.G[name], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(
                got[size].G_split[name], ref.G_split[name], rtol=1e-5, atol=1e-8
            )
            group = ref.group_of[name]
            torch.testing.assert_close(got[size].Z[group], ref.Z[group], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="even"):
        next(rr.prefix_statistics(model, examples, targets, config, (3, 8)))


def test_lora_one_subspace_split_identical_halves_and_random_halves(tiny):
    """Identical halves give angle 0, cos² 1 and zero regret; the split-half SNR is +inf then."""
    from types import SimpleNamespace

    g = torch.randn(20, 12, dtype=torch.float64)
    same = SimpleNamespace(halves=lambda n: (g, g), split_weights=(1.0, 1.0), G={"w": g})
    out = rr.lora_one_subspace_split(same, "w")
    assert out["split_angle_max"] < 1e-6 and out["split_mean_cos2"] == pytest.approx(1.0)
    assert abs(out["split_rel_regret"]) < 1e-12 and math.isinf(out["snr_split"])
    h = torch.randn(20, 12, dtype=torch.float64)
    other = SimpleNamespace(halves=lambda n: (g, h), split_weights=(1.0, 1.0), G={"w": (g + h) / 2})
    out = rr.lora_one_subspace_split(other, "w")
    assert out["split_angle_max"] > 0.3 and out["split_rel_regret"] > 0


def test_quick_run_writes_files(tmp_path):
    res = rr.run(tmp_path, quick=True)
    summary = json.loads((tmp_path / "real_regime.json").read_text())
    assert set(summary["methods"]) == set(rr.METHODS)
    for path in (res.png, res.csv, *res.extra_csv):
        assert path.stat().st_size > 0
    default = summary["methods"]["lora_da_default"]
    assert set(default["spearman_vs_angle_max"]) == set(rr.SNRS)  # plug-in, split, sandwich
    rho = default["spearman_vs_angle_max"]["snr_split"]
    assert set(rho["within_size"]) == {str(s) for s in rr.QUICK_SIZES}
    assert "pooled_confounded" in rho
    assert set(summary["methods"]["lora_one_subspace"]["spearman_vs_angle_max"]) == {"snr_split"}
    with res.extra_csv[0].open() as fh:
        header = fh.readline().strip().split(",")
    assert header == ["method", "n_calib", "layer", "d_in", *rr.METRICS]


def test_spearman_within_each_size_is_not_the_pooled_one():
    """Within every |S| a higher SNR goes with a *larger* angle (ρ = +1), while both fall with
    |S| across sizes: the pooled ρ is negative, the confounding the within-|S| values remove."""
    rows = [
        {"n_calib": size, "snr": 10.0 * size + k, "split_angle_max": 1.0 / size + 0.01 * k}
        for size in (1, 2, 4)
        for k in range(5)
    ]
    out = rr.spearman_within(rows, "snr")
    assert {s: v["rho"] for s, v in out["within_size"].items()} == pytest.approx(
        {"1": 1.0, "2": 1.0, "4": 1.0}
    )
    assert all(v["layers"] == 5 for v in out["within_size"].values())
    assert out["pooled_confounded"]["rho"] < -0.5 and out["pooled_confounded"]["layers"] == 15
    rows[0]["snr"] = math.inf  # a non-finite SNR leaves its pair out
    assert rr.spearman_within(rows, "snr")["within_size"]["1"]["layers"] == 4


def test_negative_fraction():
    assert rr.negative_fraction([-1.0, 2.0, math.nan, -0.5]) == pytest.approx(2 / 3)
    assert math.isnan(rr.negative_fraction([math.nan]))


@pytest.fixture(scope="module")
def tiny_stats(tiny):
    from lora_da_ref.torch import LoraDAConfig, find_target_modules

    model, examples = tiny
    targets = find_target_modules(model, rr.PROJECTIONS)
    config = LoraDAConfig(rank=4, target_modules=rr.PROJECTIONS, diagnostics="full", n_train=10.0)
    _, stats = next(rr.prefix_statistics(model, examples, targets, config, (8,)))
    return stats, config


def _halves_A(stats, name, config, bias):
    from lora_da_ref.torch.factors import kfac_fisher

    J = kfac_fisher(stats, name, config)
    return rr.split_half_stability(rr.half_omegas(stats, name, config, J, bias), name, config)


def test_split_half_harness_measures_as_calibration_diagnostics(tiny_stats):
    """``bias="delta"`` through :func:`half_omegas` and :func:`split_half_stability` gives
    LoRA-DA's own split-half metrics: the ablation is measured exactly as LoRA-DA is."""
    from lora_da_ref.torch.diagnostics import calibration_diagnostics
    from lora_da_ref.torch.factors import kfac_fisher

    stats, config = tiny_stats
    for name in stats.G:
        ref = calibration_diagnostics(stats, name, config, kfac_fisher(stats, name, config))
        got, _ = _halves_A(stats, name, config, "delta")
        assert got == pytest.approx({k: ref[k] for k in rr.STABILITY}, rel=1e-9, abs=1e-12)


def test_neg_g_ablation_builds_omega_from_the_gradient(tiny_stats):
    """The ablation's A0 is not LoRA-DA's (ΔŴ = −Ĵ⁻¹Ĝ turns the subspace on this model); with
    β = 0 it is exactly LoRA-One's top-r left singular subspace of −Ĝ_h (Remark 4.3)."""
    from lora_da_ref.torch.baselines import lora_one_subspace
    from lora_da_ref.torch.diagnostics import principal_angles

    stats, config = tiny_stats
    largest = []
    for name in stats.G:
        _, A_da = _halves_A(stats, name, config, "delta")
        for bias in ("matched", "literal"):
            _, A_g = _halves_A(stats, name, config, bias)
            largest.append(max(float(principal_angles(a, b).max()) for a, b in zip(A_da, A_g)))
        _, A_g = _halves_A(stats, name, config.replace(variance_weight=0.0), "matched")
        for a, g in zip(A_g, stats.halves(name)):
            top = lora_one_subspace(-g.double(), config.rank)  # (d_in, r)
            assert float(principal_angles(a, top).max()) < 1e-6, name
    assert min(largest) > 0.05, largest  # every layer: the two directions differ


def test_neg_g_ablation_equals_lora_da_with_an_identity_fisher(tiny_stats):
    """With Z = I and Y = 1, ΔŴ ∝ −Ĝ: the matched ablation's Ω is LoRA-DA's (any damping), the
    literal one's too when undamped; so the two subspaces coincide."""
    from lora_da_ref.torch.diagnostics import principal_angles

    stats, config = tiny_stats
    flat = copy.deepcopy(stats)
    for group, Z in flat.Z.items():
        flat.Z[group] = torch.eye(Z.shape[0], dtype=Z.dtype)
    for name, Y in flat.Y.items():
        flat.Y[name] = torch.ones_like(Y)
    for bias, cfg in (("matched", config), ("literal", config.replace(damping=0.0))):
        for name in flat.G:
            _, A_da = _halves_A(flat, name, cfg, "delta")
            _, A_g = _halves_A(flat, name, cfg, bias)
            for a, b in zip(A_da, A_g):
                assert float(principal_angles(a, b).max()) < 1e-6, (bias, name)


def test_ratio_and_sandwich_snr(tiny_stats):
    """The matched ablation keeps LoRA-DA's variance/bias balance, the literal one does not; the
    sandwich SNR is the plug-in SNR when nothing is damped."""
    from lora_da_ref.torch.factors import kfac_fisher

    stats, config = tiny_stats
    compared = []
    for name in stats.G:
        z = rr.z_spectrum(stats, name)
        da, J = rr.lora_da_split(stats, name, config, z)
        matched = rr.ablation_split(stats, name, config, J, "matched", z)
        literal = rr.ablation_split(stats, name, config, J, "literal", z)
        assert matched["var_bias_ratio"] == pytest.approx(da["var_bias_ratio"], rel=1e-12)
        assert literal["var_bias_ratio"] != pytest.approx(da["var_bias_ratio"], rel=1e-3)
        assert (
            matched["snr_split"]
            == literal["snr_split"]
            == rr.lora_one_subspace_split(stats, name)["snr_split"]
        )
        assert da["snr_sandwich"] != pytest.approx(da["snr_plugin"], rel=1e-3)  # damped: differ
        undamped = config.replace(damping=0.0)
        if kfac_fisher(stats, name, undamped).damping != {"Z": 0.0, "Y": 0.0}:
            continue  # a singular Z (fewer tokens than inputs): damped at the rounding floor
        got, _ = rr.lora_da_split(stats, name, undamped, z)
        assert got["snr_sandwich"] == pytest.approx(got["snr_plugin"], rel=1e-6), name
        compared.append(name)
    assert len(compared) >= 4, compared


def test_split_mean_cos2_lies_between_the_extreme_angles(tiny):
    """``split_mean_cos2`` (the one key added to calibration_diagnostics for this study) is the
    mean of cos² over the principal angles: between cos² of the largest and of the smallest."""
    from lora_da_ref.torch import LoraDAConfig, find_target_modules
    from lora_da_ref.torch.diagnostics import calibration_diagnostics
    from lora_da_ref.torch.factors import kfac_fisher

    model, examples = tiny
    targets = find_target_modules(model, rr.PROJECTIONS)
    config = LoraDAConfig(rank=4, target_modules=rr.PROJECTIONS, diagnostics="full", n_train=10.0)
    _, stats = next(rr.prefix_statistics(model, examples, targets, config, (8,)))
    for name in targets:
        d = calibration_diagnostics(stats, name, config, kfac_fisher(stats, name, config))
        lo, hi = math.cos(d["split_angle_max"]) ** 2, math.cos(d["split_angle_min"]) ** 2
        assert lo - 1e-12 <= d["split_mean_cos2"] <= hi + 1e-12, (name, d)
        assert d["split_mean_cos2"] < hi - 1e-6 or lo > hi - 1e-6  # a mean, not the maximum
