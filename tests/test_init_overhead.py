"""benchmarks/init_overhead.py: its smoke run, its float32-sums control, and that its LAPACK floor
and flop counts measure what they claim (no timing assertions: timings live in the benchmark)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_da_ref.data import tiny_llama
from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
from lora_da_ref.torch.diagnostics import principal_angles
from lora_da_ref.torch.factors import solve_layer

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_init_overhead_benchmark_quick_prints_its_json():
    """Smoke test only: the benchmark runs and reports every field (no timing assertions)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "init_overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # no thread oversubscription on shared CI
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["setup"]["quick"] is True
    keys = {
        "plain_pass_s", "statistics_pass_s", "solves_s", "solves_off_s", "solves_full_s",
        "lapack_floor_s", "init_total_s", "init_off_total_s", "init_full_total_s",
        "multipass_total_s", "multipass_passes", "statistics_over_plain", "init_over_plain",
        "solves_over_lapack_floor", "solves_per_layer_s", "roofline", "flops",
        "speedup_vs_multipass", "goals_met", "peak_extra_memory_mb", "statistics_size_mb",
        "statistics_off_float32_sums_pass_s", "plain_pass_init_group_s", "cost_over_plain",
        "statistics_full_pass_s",
    }  # fmt: skip
    parts = {
        "statistics_pass_float32_sums", "float64_running_sums", "split_half_gradient_sums",
        "rounding_measurement_full_tier", "solves_algorithm_1", "solves_cheap_diagnostics",
        "solves_full_diagnostics",
    }  # fmt: skip
    assert set(result["presets"]) == {"default", "official"}
    for row in result["presets"].values():
        assert keys <= set(row)
        assert set(row["cost_over_plain"]) == parts
        assert row["multipass_passes"] == 2  # 4 layers, 2 per pass
        assert row["plain_pass_s"] > 0 and row["init_total_s"] > 0 and row["lapack_floor_s"] > 0


def test_init_overhead_float32_sums_control_is_in_force_and_then_undone():
    """The benchmark's float32-running-sums control must change the pass's sums while it runs and
    leave float64 behind, also after an error: a control that leaked would time every later
    phase (the whole init) with the unsupported float32 sums."""
    from lora_da_ref.torch import statistics

    bench = _benchmark_module("init_overhead")
    model = tiny_llama(0, hidden=16, layers=1, intermediate=24, heads=2, vocab=32)
    ids = torch.randint(3, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    config = LoraDAConfig.official(rank=2, diagnostics="off")
    targets = find_target_modules(model, config.target_modules)
    sums = bench.collect_with_sums(torch.float32, model, batches, targets, config, progress=False)
    assert all(z.dtype == torch.float32 for z in sums.Z.values())  # in force during the call
    assert statistics.RUNNING_SUM_DTYPE == torch.float64
    with pytest.raises(RuntimeError), bench.running_sums(torch.float32):
        raise RuntimeError("a failing phase")
    assert statistics.RUNNING_SUM_DTYPE == torch.float64
    plain = collect_statistics(model, batches, targets, config, progress=False)
    assert all(z.dtype == torch.float64 for z in plain.Z.values())


def _small_case():
    bench = _benchmark_module("init_overhead")
    sizes = dict(layers=2, hidden=32, intermediate=86, heads=4, vocab=64, sequences=4, length=24)
    model = bench.make_model(sizes, torch.device("cpu"))
    batches = bench.make_batches(sizes, 1, torch.device("cpu"))
    return bench, model, batches


@pytest.mark.parametrize("preset", ["default", "paper_literal"])
def test_lapack_floor_does_the_solve_s_work(preset):
    """The floor's bare calls give the library's A0 (its r smallest eigenvectors of the same Ω):
    a floor that skipped a call (no normalisation, no Y⁻¹, a wrong coefficient) would time less
    work than Algorithm 1 and make the ratio look better than it is."""
    bench, model, batches = _small_case()
    config = LoraDAConfig.preset(preset, rank=3, diagnostics="off", n_train=50)
    targets = find_target_modules(model, config.target_modules)
    stats = collect_statistics(model, batches, targets, config, progress=False)
    for group, (Z, layers) in bench.floor_inputs(stats, config).items():
        vectors = bench.lapack_floor_task(Z, layers, config)
        names = bench.layer_tasks(stats, list(stats.G))[group]
        for name, V in zip(names, vectors, strict=True):
            A = solve_layer(stats, name, config).eig.vectors
            assert float(principal_angles(A, V[:, :3]).max()) < 1e-8, name


def test_pass_flops_count_the_extra_products():
    """The statistics pass's counted flops exceed a forward + input-gradient backward (weights
    frozen, the gradient flowing from the embeddings' output) by the extra products G, Z, Y
    counted from shapes (to 10 %: the panels of Z's lower triangle and the masks are the rest);
    the plain pass is the same forward + backward with weight gradients. Catches an extra-product
    count that misses Z or G, or a plain pass timed without its weight gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    bench, model, batches = _small_case()
    config = LoraDAConfig(rank=2, diagnostics="off")
    targets = find_target_modules(model, config.target_modules)
    flops = bench.pass_flops(model, batches, targets, config)
    probe = batches[:2]
    scale = len(batches) / len(probe)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    try:
        with FlopCounterMode(display=False) as frozen:
            for b in probe:
                x = embed(b["input_ids"]).requires_grad_(True)
                out = model(inputs_embeds=x, attention_mask=b["attention_mask"], labels=b["labels"])
                out.loss.backward()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    one_pass = frozen.get_total_flops() * scale / 1e9
    extra = flops["statistics_pass_gflop"] - one_pass
    assert extra == pytest.approx(flops["extra_products_gflop"], rel=0.10)
    assert flops["plain_pass_gflop"] > one_pass + 0.5 * (flops["extra_products_gflop"])
