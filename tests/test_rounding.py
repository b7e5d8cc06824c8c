"""The statistics pass measures the rounding of its products, and the precision bound uses it.

On the 2-layer tiny LLaMA, float32 statistics against float64 ones of the same batches (the
model runs in float32 in both passes: they differ only by the rounding of the products):

* the pass's float64 sketch is the float64 product: ``Σ_b x_bᵀ(x_b Ω)`` equals the float64
  pass's ``Z`` times ``Ω`` to float64 rounding (likewise G, and a diagonal Y entry by entry);
* the rounding it reports is the real one, ``‖Ẑ − Z‖_F``, within the sketch's sampling error;
* ``precision_bound`` scaled to it stays above the measured float32-vs-float64 angle.
"""

from __future__ import annotations

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
from lora_da_ref.torch.diagnostics import principal_angles
from lora_da_ref.torch.factors import solve_layer
from lora_da_ref.torch.statistics import (
    ROUNDING_PROBES,
    accumulate_statistics,
    rounding_probe,
)
from tests.torch_cases import llama_batches, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The float64 sketch against the float64 pass: the same products in float64, summed in another
# order (ΩᵀxᵀxΩ against (xᵀx)Ω): a few eps64 relative (measured ≤ 6e-16). A sketch taken in
# float32 is off by ~eps32 = 6e-8.
SKETCH_RTOL = 1e-12
# ‖(Ẑ − Z)Ω‖_F/√k estimates ‖Ẑ − Z‖_F with k = 8 columns of random signs: its square is
# unbiased, with a relative spread of at most √(2/k) = 0.5 (a rank-1 error spread evenly; less
# for a larger stable rank or an error on few channels). Ω is seeded and the model fixed, so the
# test is deterministic on one machine; the factor 2 leaves room for another BLAS's rounding
# (measured here: 0.92–1.12; on SmolLM2: 0.77–1.29).
ESTIMATE_FACTOR = 2.0
PRESETS = {  # the full tier: the one whose pass measures the rounding
    "default (diagonal Y, per-sequence scales)": LoraDAConfig(diagnostics="full"),
    "paper_literal (full Y, token scales)": LoraDAConfig.paper_literal(diagnostics="full"),
}


@pytest.fixture(scope="module", params=list(PRESETS))
def passes(request):
    torch.manual_seed(0)
    model = tiny_llama()
    batches = llama_batches(n_batches=4, batch=2, seq=12)
    c32 = PRESETS[request.param].replace(dtype=torch.float32, rank=4)
    c64 = c32.replace(dtype=torch.float64)
    targets = find_target_modules(model, c32.target_modules)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in every pass
    try:
        sums = accumulate_statistics(model, batches, targets, c32, progress=False)
        s32 = collect_statistics(model, batches, targets, c32, progress=False)
        s64 = collect_statistics(model, batches, targets, c64, progress=False)
    finally:
        torch.set_num_threads(threads)
    return c32, c64, sums, s32, s64


def _statistic(stats, key):
    kind, name = key.split("/", 1)
    return getattr(stats, kind)[name]


def test_the_pass_sketches_the_float64_products(passes):
    """Catches a sketch taken in the statistics dtype, a missing score or gradient weight, the
    per-sequence scales rounded to float32 first, or a sketch of the wrong statistic."""
    _, _, sums, _, s64 = passes
    assert sums.rounding
    for key, sketch in sums.rounding.items():
        exact = _statistic(s64, key)
        exact = exact * (sums.gradient_weight if key[0] == "G" else sums.tokens)
        if sketch.ndim == 2:
            exact = exact @ rounding_probe(exact.shape[1], exact.device)
        rel = float((sketch - exact).norm() / exact.norm())
        assert rel <= SKETCH_RTOL, f"{key}: relative {rel:.2e}"


def test_the_measured_rounding_is_the_real_rounding(passes):
    """``KFACStatistics.rounding`` against ``‖statistic(float32) − statistic(float64)‖_F``:
    a measurement against the unnormalised sums, or of the sketch alone, is off by orders of
    magnitude; a diagonal Y is measured exactly."""
    _, _, _, s32, s64 = passes
    for key, measured in s32.rounding.items():
        real = float((_statistic(s32, key) - _statistic(s64, key)).norm())
        assert real > 0, key
        if _statistic(s32, key).ndim == 1:
            assert measured == pytest.approx(real, rel=1e-6), key
        else:
            assert 1 / ESTIMATE_FACTOR <= measured / real <= ESTIMATE_FACTOR, (key, measured, real)
    assert len(s32.rounding) == sum(1 for _ in s32.Z) + 2 * len(s32.G), (
        "one measurement per Z group, and per Y and G"
    )


def test_the_precision_bound_stays_above_the_measured_angle(passes):
    """The bound, scaled to the measured rounding, is never below the float32-vs-float64 angle
    of A0 (an over-reduced scale, e.g. the measurement divided by the token count once more,
    puts it below on every layer)."""
    c32, c64, _, s32, s64 = passes
    z32, z64 = {}, {}
    for name in s32.G:
        a = solve_layer(s32, name, c32, z32)
        b = solve_layer(s64, name, c64, z64, probe=False)
        angle = float(principal_angles(a.A, b.A).max())
        bound = a.diagnostics["precision_bound"]
        assert angle <= bound, f"{name}: measured {angle:.3g} rad > bound {bound:.3g}"


def test_nothing_is_measured_in_float64_or_below_the_full_tier():
    model = tiny_llama()
    batches = llama_batches(n_batches=2, batch=2, seq=8)
    configs = (
        LoraDAConfig(dtype=torch.float64, diagnostics="full"),
        LoraDAConfig(),  # the cheap tier: its bound uses the rounding model's size
        LoraDAConfig(diagnostics="off"),
    )
    for config in configs:
        targets = find_target_modules(model, config.target_modules)
        stats = collect_statistics(model, batches, targets, config, progress=False)
        assert stats.rounding == {}, config
    assert rounding_probe(7, torch.device("cpu")).shape == (7, ROUNDING_PROBES)
