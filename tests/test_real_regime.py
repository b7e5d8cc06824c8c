"""paper_figs/real_regime.py: chunked statistics equal one pass; the LoRA-One split is right; the
``--quick`` run on SmolLM2 writes its files."""

from __future__ import annotations

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


def test_lora_one_split_identical_halves_and_random_halves(tiny):
    """Identical halves give angle 0, cos² 1 and zero regret; the SNR is +inf then."""
    from types import SimpleNamespace

    g = torch.randn(20, 12, dtype=torch.float64)
    same = SimpleNamespace(halves=lambda n: (g, g), split_weights=(1.0, 1.0), G={"w": g})
    out = rr.lora_one_split(same, "w")
    assert out["split_angle_max"] < 1e-6 and out["split_mean_cos2"] == pytest.approx(1.0)
    assert abs(out["split_rel_regret"]) < 1e-12 and math.isinf(out["snr"])
    h = torch.randn(20, 12, dtype=torch.float64)
    other = SimpleNamespace(halves=lambda n: (g, h), split_weights=(1.0, 1.0), G={"w": (g + h) / 2})
    out = rr.lora_one_split(other, "w")
    assert out["split_angle_max"] > 0.3 and out["split_rel_regret"] > 0


@pytest.mark.slow
def test_quick_run_writes_files(tmp_path):
    res = rr.run(tmp_path, quick=True)
    summary = json.loads((tmp_path / "real_regime.json").read_text())
    assert set(summary["methods"]) == set(rr.METHODS)
    for path in (res.png, res.csv, *res.extra_csv):
        assert path.stat().st_size > 0


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
