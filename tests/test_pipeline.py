"""The one pipeline (collect → reduce → solve → gather) and the names it shares with NumPy."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_da_ref as np_ref
import lora_da_ref.torch as torch_api
from lora_da_ref import principal_angles
from lora_da_ref.torch import KFACStatistics, KroneckerFisher, LoraDAConfig, find_target_modules
from lora_da_ref.torch.pipeline import SingleProcess, run_pipeline, solve_layers, solve_workers
from lora_da_ref.torch.solvers import smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACSums, accumulate_statistics
from lora_da_ref.torch.threads import one_blas_thread
from tests.torch_cases import (
    LLAMA_TARGETS,
    TokenMLP,
    assert_state_equal,
    llama_batches,
    mlp_batches,
    mlp_loss,
    model_state,
    tiny_llama,
)

# float64 on both sides, well-conditioned factors: the two implementations agree to round-off.
F64_RAD = 1e-9
F64_RTOL = 1e-9
# Two shards vs one: the per-batch float32 products are identical, the float64
# running sums differ by float64 round-off only, so A@B may differ by ≈ κ·eps64 ≪ 1e-6.
SHARDS_RTOL = 1e-6
TORCH_ROOT = Path(__file__).resolve().parent.parent / "lora_da_ref" / "torch"


def _problem(d1=7, d2=4, seed=0):
    rng = np.random.default_rng(seed)
    X, S = rng.standard_normal((40, d1)), rng.standard_normal((40, d2))
    Z, Y = X.T @ X / 40 + 0.1 * np.eye(d1), S.T @ S / 40 + 0.1 * np.eye(d2)
    return Y, Z, rng.standard_normal((d1, d2))


def test_lora_da_init_torch_equals_numpy():
    """STYLE.md's four lines: the same (J, G, n, r) through the NumPy lora_da_init and its
    torch twin of the same name."""
    Y, Z, G = _problem()
    A, B = np_ref.lora_da_init(np_ref.KroneckerFisher(Y, Z), G, 50, 3)
    At, Bt = torch_api.lora_da_init(
        KroneckerFisher(*map(torch.from_numpy, (Y, Z))), torch.from_numpy(G), 50, 3
    )
    assert principal_angles(At.numpy(), A).max() < F64_RAD
    np.testing.assert_allclose((At @ Bt).numpy(), A @ B, rtol=F64_RTOL, atol=F64_RTOL)


def test_smallest_eigenpairs_unpack_alike():
    """Both sides return the pair (eigenvalues (r,), vectors (d, r)); torch adds diagnostics."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((9, 9))
    omega = M + M.T
    values, vectors = np_ref.smallest_eigenpairs(omega, 4)
    result = smallest_eigenpairs(torch.from_numpy(omega), 4)
    values_t, vectors_t = result
    assert result.diagnostics["solver"] == "eigh" and result.vectors is vectors_t
    np.testing.assert_allclose(values_t.numpy(), values, rtol=F64_RTOL, atol=F64_RTOL)
    assert principal_angles(vectors_t.numpy(), vectors).max() < F64_RAD


def test_degenerate_statistics_raise_naming_the_layer_and_leave_the_model():
    """Z = 0 (an input that is always zero): λ = δ·tr(Z)/d = 0 and Z + λI is singular. Both
    sides' contract: a ValueError naming the matrix (and here the layer), never silent re-damping."""
    model = TokenMLP()
    batches = [{**b, "inputs": torch.zeros_like(b["inputs"])} for b in mlp_batches()]
    before = model_state(model)
    config = LoraDAConfig(rank=2, target_modules=["0"], label_shift=0, n_train=10)
    with pytest.raises(ValueError, match=r"layer '0': Z of '0' \+ λI is not positive definite"):
        run_pipeline(model, batches, find_target_modules(model, ["0"]), config, SingleProcess(),
                     loss_fn=mlp_loss, progress=False)  # fmt: skip
    assert_state_equal(before, model_state(model))


class _TwoShards(SingleProcess):
    """Single-process stand-in for data parallelism: the batches split into two interleaved
    shards, collected separately and summed (what the all-reduce does)."""

    def collect(self, model, batches, targets, config, loss_fn, progress):
        a, b = (
            accumulate_statistics(model, part, targets, config, loss_fn=loss_fn, progress=False)
            for part in (batches[::2], batches[1::2])
        )
        for kind in ("Z", "Y", "G", "G_odd", "heavy_diag"):
            for key, value in getattr(b, kind).items():
                getattr(a, kind)[key] = getattr(a, kind)[key] + value
        for f in dataclasses.fields(KFACSums):
            if isinstance(f.default, int | float):  # the counts, not the products' dtype
                setattr(a, f.name, getattr(a, f.name) + getattr(b, f.name))
        return a


def test_two_shards_match_one_process_in_float32():
    """float32 statistics, two shards vs one, A@B within 1e-6 relative on every layer
    (it was 5.5e-4 with float32 running sums and float32 solves)."""
    model, batches = tiny_llama(), llama_batches(n_batches=6)
    config = LoraDAConfig.paper_literal(rank=4, n_train=1000)
    targets = find_target_modules(model, LLAMA_TARGETS)
    one = run_pipeline(model, batches, targets, config, SingleProcess(), progress=False)
    two = run_pipeline(model, batches, targets, config, _TwoShards(), progress=False)
    for name in one:
        AB1, AB2 = (
            one[name].A.double() @ one[name].B.double(),
            two[name].A.double() @ two[name].B.double(),
        )
        rel = float((AB1 - AB2).norm() / AB1.norm())
        assert rel <= SHARDS_RTOL, f"{name}: A@B differs by {rel:.2e} relative"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_import_cycle_between_init_pipeline_and_distributed():
    """init → pipeline, distributed; distributed → pipeline; never back to init."""
    lower = [TORCH_ROOT / "pipeline.py", TORCH_ROOT / "factors.py"]
    lower += sorted((TORCH_ROOT / "distributed").glob("*.py"))
    for path in lower:
        assert "lora_da_ref.torch.init" not in _imports(path), path.name
    assert not any(m.startswith("lora_da_ref.torch.distributed") for m in _imports(lower[0]))


# ----------------------------------------------------------------------------- solve workers


def _group_statistics(widths=(160, 160, 96), layers_per_group=2, d_out=48, seed=0):
    """Synthetic float32 statistics: one Z per group, layers sharing it (as q/k/v, gate/up)."""
    gen = torch.Generator().manual_seed(seed)
    Z, Y, G, group_of = {}, {}, {}, {}
    for g, d in enumerate(widths):
        X = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
        Z[f"g{g}"] = (X.mT @ X / X.shape[0]).float()
        for k in range(layers_per_group):
            name = f"g{g}.m{k}"
            S = torch.randn(4 * d_out, d_out, generator=gen, dtype=torch.float64)
            Y[name] = (S.mT @ S / S.shape[0]).float()
            G[name] = torch.randn(d, d_out, generator=gen).div(d)
            group_of[name] = f"g{g}"
    return KFACStatistics(Z, Y, G, group_of, 1000, 1000, 10, 10, gradient_weight=1000.0)


@pytest.mark.parametrize("preset", ["official", "paper_literal"])
def test_solve_workers_give_bit_identical_factors_in_the_names_order(preset):
    """Layer groups solved side by side in threads, one BLAS thread each, give bit-identical
    factors and diagnostics for any number of workers, equal to the one-thread serial solve, in
    the order of ``names``; the one-worker default (torch's threads) differs by round-off only.
    Catches a cache shared across threads, a task that mixes groups, results in completion
    order, and a worker left on the multi-threaded BLAS (rounds differently)."""
    stats = _group_statistics()
    config = LoraDAConfig.preset(preset, rank=3, n_train=100)
    names = sorted(stats.G, reverse=True)  # not the groups' order
    with one_blas_thread():
        serial = solve_layers(stats, names, config.replace(solve_workers=1))
    threads = torch.get_num_threads()
    for workers in (2, 3):
        got = solve_layers(stats, names, config.replace(solve_workers=workers))
        assert list(got) == names
        assert torch.get_num_threads() == threads  # restored
        for n in names:
            assert torch.equal(got[n].A, serial[n].A) and torch.equal(got[n].B, serial[n].B), n
            assert got[n].diagnostics == serial[n].diagnostics, n
    default = solve_layers(stats, names, config.replace(solve_workers=1))
    for n in names:
        ab, ref = default[n].A @ default[n].B, serial[n].A @ serial[n].B
        assert float((ab - ref).norm() / ref.norm()) < SHARDS_RTOL, n


def test_a_failing_layer_in_a_worker_raises_naming_it():
    """A non-PD Z in one group fails the solve with the layer's name, from a worker thread; the
    other tasks do not hide it, and torch's thread count is restored."""
    stats = _group_statistics()
    stats.Z["g1"] = -stats.Z["g1"]  # negative definite: no damping makes it PD
    threads = torch.get_num_threads()
    config = LoraDAConfig.paper_literal(rank=3, n_train=100, solve_workers=2)
    with pytest.raises(ValueError, match=r"layer 'g1\.m0'.*Z of 'g1'"):
        solve_layers(stats, list(stats.G), config)
    assert torch.get_num_threads() == threads


def test_automatic_solve_workers():
    """torch's threads (≤ 8) for CPU statistics of inputs ≤ 4096 wide; 1 above, or when told."""
    stats = _group_statistics(widths=(8, 8), d_out=4)
    tasks = {"g0": ["g0.m0"], "g1": ["g1.m0"]}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert solve_workers(stats, tasks, LoraDAConfig()) == 3
        assert solve_workers(stats, tasks, LoraDAConfig(solve_workers=1)) == 1
        stats.Z["g1"] = torch.zeros(0).new_empty((4097, 4097))  # only its shape is read
        assert solve_workers(stats, tasks, LoraDAConfig()) == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="solve_workers"):
        LoraDAConfig(solve_workers=0)


def test_the_one_layer_call_is_the_numpy_twin_and_not_the_model_call():
    """The one-layer call has the NumPy reference's name and takes its arguments, by the same
    names; the whole-model call (whose name is its anagram) takes a model and batches instead,
    so passing one where the other is meant fails at the first argument."""
    import inspect

    assert {"init_lora_da", "lora_da_init"} <= set(torch_api.__all__)
    assert all(hasattr(torch_api, name) for name in torch_api.__all__)
    ours = list(inspect.signature(torch_api.lora_da_init).parameters)
    theirs = list(inspect.signature(np_ref.lora_da_init).parameters)
    assert ours[: len(theirs)] == theirs, (ours, theirs)
    model_call = list(inspect.signature(torch_api.init_lora_da).parameters)
    assert model_call[:2] == ["model", "batches"], model_call
