"""Memory plan: bytes from shapes == what the pass holds; the pass plan picked once, before any
pass, from LoraDAConfig(max_statistics_bytes=...) (default: a fraction of the free memory)."""

from __future__ import annotations

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, find_target_modules, init_lora_da, memory
from lora_da_ref.torch.memory import (
    input_groups,
    plan_layers_per_pass,
    resolve_layers_per_pass,
    statistics_bytes,
)
from lora_da_ref.torch.pipeline import pass_plan
from lora_da_ref.torch.statistics import accumulate_statistics, finalize
from tests.torch_cases import LLAMA_TARGETS, llama_batches, single_thread, tiny_llama  # noqa: F401


def _held_bytes(sums) -> dict[str, int]:
    """Bytes of the running sums a pass returns, per kind (``G`` with the split ``G_odd``, ``Z``
    with the float64 rows' part of its diagonal, each kind with the float64 sketch that measures
    its rounding)."""
    held = {
        kind: sum(t.numel() * t.element_size() for t in getattr(sums, kind).values())
        for kind in ("Z", "Y", "G", "G_odd", "heavy_diag")
    }
    held["G"] += held.pop("G_odd")
    held["Z"] += held.pop("heavy_diag")
    for key, sketch in sums.rounding.items():
        held[key.split("/", 1)[0]] += sketch.numel() * sketch.element_size()
    return held


@pytest.mark.parametrize("output_factor", ["full", "diagonal"])
@pytest.mark.parametrize("diagnostics", ["full", "cheap", "off"])
def test_bytes_from_shapes_equal_what_the_pass_holds(output_factor, diagnostics):
    model = tiny_llama()
    cfg = LoraDAConfig.paper_literal(rank=2, output_factor=output_factor, diagnostics=diagnostics)
    targets = find_target_modules(model, LLAMA_TARGETS)
    sums = accumulate_statistics(model, llama_batches(), targets, cfg, progress=False)
    assert input_groups({n: (m.in_features, m.out_features) for n, m in targets.items()}) == (
        sums.group_of
    )  # the shape-based estimate of shared inputs is what the pass detects (LLaMA)
    plan = statistics_bytes(targets, cfg)
    held = _held_bytes(sums)
    for kind in ("Z", "Y", "G"):
        assert sum(getattr(b, kind) for b in plan.values()) == held[kind], kind


def test_finalize_reuses_the_sums_memory_and_refuses_twice():
    model = tiny_llama()
    cfg = LoraDAConfig(rank=2)
    targets = find_target_modules(model, LLAMA_TARGETS)
    sums = accumulate_statistics(model, llama_batches(), targets, cfg, progress=False)
    kinds = ("Z", "Y", "G", "G_odd")
    pointers = {t.data_ptr() for kind in kinds for t in getattr(sums, kind).values()}
    stats = finalize(sums)
    for kind in ("Z", "Y", "G", "G_split"):
        assert all(t.data_ptr() in pointers for t in getattr(stats, kind).values()), kind
    with pytest.raises(RuntimeError, match="already finalized"):
        finalize(sums)


def _two_layer_shapes(layers: int = 4) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        for leaf, shape in (("self_attn.q_proj", (8, 8)), ("mlp.down_proj", (16, 8))):
            shapes[f"model.layers.{i}.{leaf}"] = shape
    return shapes


def test_plan_picks_the_largest_fitting_number_of_layers():
    shapes = _two_layer_shapes(4)
    # per layer: Z 64+256 and the float64 rows' part of its diagonal 8+16, Y 64+64, G 64+128
    cfg = LoraDAConfig.paper_literal(diagnostics="off")
    per_layer = (64 + 256 + 8 + 16 + 64 + 64 + 64 + 128) * 8  # float64 running sums
    assert plan_layers_per_pass(shapes, cfg, 4 * per_layer) == 4
    assert plan_layers_per_pass(shapes, cfg, 3 * per_layer) == 3  # passes of 3 + 1 layers
    assert plan_layers_per_pass(shapes, cfg, 3 * per_layer - 1) == 2
    assert plan_layers_per_pass(shapes, cfg, per_layer) == 1
    with pytest.raises(ValueError, match=r"model\.layers\.0.*needs 5,312 bytes"):
        plan_layers_per_pass(shapes, cfg, per_layer - 1)


def _official_layer_bytes() -> int:
    """One layer of :func:`_two_layer_shapes` under the official preset (diagonal Y, split-half
    G; the cheap tier: no rounding sketches; the float64 rows' part of diag Z), float64 sums."""
    return (64 + 256 + 8 + 16 + 8 + 8 + 2 * (64 + 128)) * 8


def test_every_preset_plans_one_pass_when_the_statistics_fit():
    """Passes are a memory decision: no preset fixes them, and an explicit layers_per_pass (the
    official code's 8) is kept, lowered only when the budget is smaller."""
    shapes = _two_layer_shapes(16)
    for make in (LoraDAConfig, LoraDAConfig.official, LoraDAConfig.paper_literal):
        assert make().layers_per_pass is None
        assert make().max_statistics_bytes == "auto"
        assert resolve_layers_per_pass(shapes, make(max_statistics_bytes=10**12)) is None
        assert resolve_layers_per_pass(shapes, make()) is None  # "auto": this machine's memory
    official8 = LoraDAConfig.official(layers_per_pass=8, max_statistics_bytes=10**12)
    assert resolve_layers_per_pass(shapes, official8) == 8
    per_layer = _official_layer_bytes()
    tight = LoraDAConfig.official(layers_per_pass=8, max_statistics_bytes=3 * per_layer)
    assert resolve_layers_per_pass(shapes, tight) == 3
    with pytest.raises(ValueError, match="max_statistics_bytes must be positive"):
        LoraDAConfig(max_statistics_bytes=0)


def test_auto_budget_is_a_fraction_of_the_available_memory(monkeypatch):
    """ "auto" = AUTO_BUDGET_FRACTION of the device's available memory: with 1 MB available the
    16-layer model (about 16 kB per layer) needs passes of at most ~30 layers' worth: one pass;
    with 40 kB, passes of as many layers as half of it holds."""
    shapes = _two_layer_shapes(16)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10**6)
    assert resolve_layers_per_pass(shapes, LoraDAConfig.official()) is None
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 40_000)
    per_layer = _official_layer_bytes()
    expected = int(memory.AUTO_BUDGET_FRACTION * 40_000) // per_layer
    assert resolve_layers_per_pass(shapes, LoraDAConfig.official()) == expected
    assert memory.available_bytes.__name__ == "<lambda>"  # the patch is what was used
    assert memory.statistics_budget(LoraDAConfig(max_statistics_bytes=None)) is None


def test_available_bytes_reads_the_machine():
    free = memory.available_bytes()
    assert free is None or 0 < free < 2**50


def test_budget_splits_the_pass_and_leaves_the_result_unchanged():
    """A budget of one layer's statistics: one pass per layer (the model runs twice as often),
    and the same factors as one pass."""
    model = tiny_llama(dtype=torch.float64)
    targets = find_target_modules(model, LLAMA_TARGETS)
    cfg = LoraDAConfig.paper_literal(rank=2, dtype=torch.float64, n_train=100)
    one_layer = max(
        sum(b.total for n, b in statistics_bytes(targets, cfg).items() if f".{i}." in n)
        for i in range(2)
    )
    budget = cfg.replace(max_statistics_bytes=one_layer)
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    a = init_lora_da(model, llama_batches(), budget, progress=False)
    hook.remove()
    assert len(calls) == 2 * len(llama_batches())  # two passes over the 3 batches
    assert [len(p) for p in pass_plan(model, targets, budget)] == [7, 7]
    b = init_lora_da(model, llama_batches(), cfg, progress=False)
    assert all(torch.equal(a[n].A, b[n].A) for n in a)
