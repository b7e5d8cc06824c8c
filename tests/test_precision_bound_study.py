"""benchmarks/precision_bound_study.py on a tiny LLaMA: the spectral bound is the same model with
a sharper gap, so it can only be smaller, and the rounding ratios are measured, not assumed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
from tests.torch_cases import llama_batches, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_bound_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("precision_bound_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model = tiny_llama()
    batches = llama_batches(n_batches=4, batch=2, seq=12)
    targets = find_target_modules(model, LoraDAConfig().target_modules)
    s = {
        dt: collect_statistics(model, batches, targets, LoraDAConfig(dtype=dt), progress=False)
        for dt in (torch.float32, torch.float64)
    }
    cache = tmp_path_factory.mktemp("cache")
    torch.save((s[torch.float32], s[torch.float64]), cache / "0.pt")
    return _study().run(str(cache), {name: 1e-6 for name in targets})


def test_the_spectral_bound_never_exceeds_the_gap_bound(result):
    """Each complement direction j > r is weighted by 1/(λ_j − λ_k)² ≤ 1/(λ_{r+1} − λ_k)²: a
    weighting that let in the first r eigenvectors (λ_j = λ_k) or a wrong order breaks this."""
    layers = result["per_layer"]
    assert layers
    for name, v in layers.items():
        assert 0 < v["spectral_bound"] <= v["bound"] * (1 + 1e-9), name


def test_the_rounding_ratios_are_measured(result):
    """float32 and float64 statistics of the same batches differ, by about the model's size: a
    study that compared a statistic with itself would report 0."""
    for name, v in result["per_layer"].items():
        for key in ("z_error_over_model", "g_error_over_model"):
            assert 1e-3 < v[key] < 1e3 and math.isfinite(v[key]), (name, key, v[key])
