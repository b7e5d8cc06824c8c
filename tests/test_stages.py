"""The two public stages and the diagnosis: statistics once, solves many.

Each test names the broken implementation it catches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_da_ref.torch import (
    LoraDAConfig,
    SolveConfig,
    StatisticsConfig,
    collect_statistics,
    diagnose,
    init_lora_da,
    lora_da_factors,
)
from tests.torch_cases import LLAMA_TARGETS, llama_batches, tiny_llama

PRESETS = {
    "default": LoraDAConfig(rank=4, target_modules=LLAMA_TARGETS),
    "official": LoraDAConfig.official(rank=4, target_modules=LLAMA_TARGETS),
    "paper_literal": LoraDAConfig.paper_literal(rank=4, target_modules=LLAMA_TARGETS),
    "debiased": LoraDAConfig(rank=4, target_modules=LLAMA_TARGETS, estimator="debiased"),
}


@pytest.fixture(scope="module")
def case():
    return tiny_llama(), llama_batches(n_batches=3)


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].A, b[name].A), name
        assert torch.equal(a[name].B, b[name].B), name


def test_one_pass_many_solves_equal_init_lora_da_bitwise(case):
    """Every preset solved from ONE statistics pass equals its own ``init_lora_da`` bit for bit,
    and the solves run no forward pass. Catches a stage that drops a setting (the solver, the
    damping, the estimator), or a solve that silently re-runs the model."""
    model, batches = case
    passes = {}  # one pass per statistics configuration: paper_literal's differs (full Y, ...)
    for config in PRESETS.values():
        key = config.statistics_config()
        if key not in passes:
            passes[key] = collect_statistics(
                model, batches, target_modules=LLAMA_TARGETS, config=key, progress=False
            )
    assert len(passes) == 2  # default, official and debiased share one pass
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        solved = {
            name: lora_da_factors(
                passes[config.statistics_config()], rank=4, config=config.solve_config()
            )
            for name, config in PRESETS.items()
        }
    finally:
        handle.remove()
    assert not calls
    stats = passes[StatisticsConfig()]
    for name, config in PRESETS.items():
        _same(solved[name], init_lora_da(model, batches, config, progress=False))
    # the presets really differ: the test would pass for a stage that ignored the solve config
    assert not torch.equal(solved["default"][next(iter(stats.G))].A,
                           solved["official"][next(iter(stats.G))].A)  # fmt: skip


def test_a_rank_per_layer(case):
    model, batches = case
    config = PRESETS["default"]
    stats = collect_statistics(model, batches, config=config, progress=False)
    names = list(stats.G)
    ranks = {n: 2 + i % 3 for i, n in enumerate(names)}
    got = lora_da_factors(stats, rank=ranks, config=config)
    _same(got, init_lora_da(model, batches, config, ranks=ranks, progress=False))
    assert {n: f.A.shape[1] for n, f in got.items()} == ranks
    with pytest.raises(ValueError, match="no entry for layer"):
        lora_da_factors(stats, rank={names[0]: 2}, config=config)
    with pytest.raises(ValueError, match="positive integer"):
        lora_da_factors(stats, rank=0, config=config)
    with pytest.raises(ValueError, match="no statistics for layer"):
        lora_da_factors(stats, rank=2, config=config, layers=["nope"])


def test_optional_accumulators_are_absent_and_free_when_off(case):
    """Without split halves the statistics carry no odd-half gradient and the split-half
    diagnostics are absent (catches a pass that keeps them whatever the config says); the
    factors do not depend on it beyond rounding: G sums the same float32 products in another
    grouping (its relative change is of float32's unit roundoff, 6e-8, times the terms'
    cancellation)."""
    model, batches = case
    on = collect_statistics(model, batches, config=StatisticsConfig(), progress=False)
    off = collect_statistics(
        model, batches, config=StatisticsConfig(split_halves=False), progress=False
    )
    assert on.G_split and not off.G_split
    for name in on.G:
        err = float((on.G[name] - off.G[name]).norm() / on.G[name].norm())
        assert err < 1e-5, (name, err)
    a = lora_da_factors(on, rank=4)
    b = lora_da_factors(off, rank=4)
    from lora_da_ref.torch.diagnostics import principal_angles

    for name in a:
        assert float(principal_angles(a[name].A, b[name].A).max()) < 1e-3, name
    layer = next(iter(a))
    assert "split_snr" in a[layer].diagnostics and "split_snr" not in b[layer].diagnostics


def test_diagnose_is_what_the_solve_records_at_that_tier(case):
    """``diagnose`` after a cheap solve gives the full tier's diagnostics as an init at the full
    tier records them (catches a diagnosis built from other intermediates than the solve's)."""
    model, batches = case
    config = PRESETS["default"]
    stats = collect_statistics(model, batches, config=config.replace(diagnostics="full"),
                               progress=False)  # fmt: skip
    full = init_lora_da(model, batches, config.replace(diagnostics="full"), progress=False)
    got = diagnose(stats, rank=4, config=config, tier="full")
    keys = ("calibration_snr", "split_snr", "split_angle_max", "precision_bound")
    for name, f in full.items():
        for key in keys:
            assert got[name][key] == pytest.approx(f.diagnostics[key], rel=1e-12), (name, key)
    cheap = lora_da_factors(stats, rank=4, config=config)
    assert "split_angle_max" not in cheap[name].diagnostics  # the cheap tier solves no halves


def test_the_bundle_splits_into_the_two_stages_without_a_gap():
    """Every LoraDAConfig field is the bundle's own (rank, targets) or lands in a stage config
    with its value (catches a field added to the bundle and forgotten in the split, which a
    preset would then silently not apply)."""
    bundle = {f.name for f in dataclasses.fields(LoraDAConfig)}
    stats = {f.name for f in dataclasses.fields(StatisticsConfig)}
    solve = {f.name for f in dataclasses.fields(SolveConfig)}
    assert bundle == (stats | solve | {"rank", "target_modules"}) - {
        "split_halves",
        "measure_rounding",
    }
    config = LoraDAConfig.official(dtype=torch.float64, label_shift=0, n_train=7.0)
    s, v = config.statistics_config(), config.solve_config()
    for name in bundle & stats:
        assert getattr(s, name) == getattr(config, name), name
    for name in bundle & solve:
        assert getattr(v, name) == getattr(config, name), name
    assert LoraDAConfig(diagnostics="off").statistics_config().split_halves is False
    assert LoraDAConfig(diagnostics="full").statistics_config().measure_rounding is True


def test_stage_configs_refuse_bad_settings_naming_the_field():
    with pytest.raises(ValueError, match="token_mask"):
        StatisticsConfig(token_mask="all")
    with pytest.raises(TypeError, match="split_halves"):
        StatisticsConfig(split_halves=1)
    with pytest.raises(ValueError, match="solver"):
        SolveConfig(solver="arpack")
    with pytest.raises(ValueError, match="damping"):
        SolveConfig(damping=-1.0)
    with pytest.raises(TypeError, match="rank is required"):
        from lora_da_ref.torch.factors import solve_layer

        solve_layer(None, "x", SolveConfig())
