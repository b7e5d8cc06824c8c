"""Data-parallel init on a 2-process gloo group (CPU): equals one process on the union of shards.

One ``torch.multiprocessing.spawn`` (module fixture) runs every scenario of
``tests/_distributed_worker.py`` in both ranks; each test checks one property of the saved results
against the single-process reference computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from lora_da_ref.cli.main import main as cli_main
from lora_da_ref.data import TINY_TEXTS
from lora_da_ref.torch import collect_statistics, find_target_modules, init_lora_da
from lora_da_ref.torch.distributed import assign_layers, resolve_process_group
from tests import _distributed_worker as worker
from tests.report import allclose_report

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(240),
    # PEFT 0.21 calls a transformers-5 deprecated property on every wrap (as in test_cli.py).
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

# float64 statistics: the spec's bound. The sums differ from one process only in the order of
# additions (rank partial sums, then the all-reduce): ~ n_batches · eps64 ≈ 1e-15 relative.
F64_STATS_RTOL = 1e-10
# Factors are returned in float32 and the float64 pipelines agree to ≪ eps32, so the projector
# AAᵀ and the update AB (norms ≤ O(1)) differ by rounding to float32: a few eps32 = 1.2e-7.
F32_OUT_ATOL = 1e-6
# float32 eigh on bitwise-equal statistics: only the LAPACK path may differ (threads). eigh is
# backward stable, error ≲ d·eps32·‖Ω‖ ≤ 64·1.2e-7 ≈ 8e-6 relative (d ≤ 64 here); with eigengaps
# O(‖Ω‖) the projector and AB move by about as much: 2e-5 (measured: 0, both ranks 1 thread).
F32_SOLVE_ATOL = 2e-5
# float32 statistics, two processes vs one: the per-batch products agree, the float64 sums
# differ by ~eps64, the factors are rounded to float32 (~6e-8 relative): 1e-6.
SHARDS_RTOL = 1e-6
RAISE_LIMIT_S = worker.GROUP_TIMEOUT_S  # a clean failure must not wait for any timeout
FSDP_RAISE_LIMIT_S = 3 * worker.FAIL_TIMEOUT_S  # one group timeout, plus start-up slack


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    init_file = str(out / "init_file")
    mp.spawn(worker.main, args=(init_file, str(out)), nprocs=worker.WORLD, join=True)
    loaded = {}
    for path in out.glob("*.pt"):
        scenario, rank = path.stem.rsplit("_", 1)
        loaded[(scenario, int(rank))] = torch.load(path, weights_only=False)
    return loaded


def _ok(results, scenario):
    for rank in range(worker.WORLD):
        assert "crash" not in results[scenario, rank], results[scenario, rank]["crash"]
    return [results[scenario, r] for r in range(worker.WORLD)]


def _reference(scenario):
    """Single process, unwrapped model, the union of both ranks' shards."""
    config_name, dtype, *_ = worker.SHARDS[scenario]
    config = worker.CONFIGS[config_name]
    model = worker.model_for(dtype)
    targets = find_target_modules(model, config.target_modules)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same matmul kernels, the same round-off
    try:
        with worker.heavy_row_ratio(scenario):
            stats = collect_statistics(
                model, worker.union(scenario), targets, config, progress=False
            )
            factors = init_lora_da(model, worker.union(scenario), config, progress=False)
    finally:
        torch.set_num_threads(threads)
    return stats, factors


def _assert_factors_close(got, ref, atol):
    """``{name: (A, B, ...)}`` against ``{name: (A0, B0, ...)}``: the projector AAᵀ and AB."""
    assert got.keys() == ref.keys()
    for name in ref:
        A, B = (t.double() for t in got[name][:2])
        A0, B0 = (t.double() for t in ref[name][:2])
        allclose_report(
            (A @ A.T).numpy(), (A0 @ A0.T).numpy(), atol=atol, rtol=0, name=f"{name} AAᵀ"
        )
        allclose_report((A @ B).numpy(), (A0 @ B0).numpy(), atol=atol, rtol=0, name=f"{name} AB")


def _pairs(factors):
    return {n: (f.A, f.B) for n, f in factors.items()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scenario", ["uneven64", "zero64", "fsdp64", "fsdp_zero64"])
def test_float64_equals_single_process_on_union(results, scenario):
    ranks = _ok(results, scenario)
    stats, factors = _reference(scenario)
    got = ranks[0]["stats"]
    assert got["tokens"] == stats.tokens
    for kind in ("Z", "Y", "G"):
        ref = getattr(stats, kind)
        assert set(got[kind]) == set(ref), kind
        for name in ref:
            rel = _rel(got[kind][name], ref[name])
            assert rel <= F64_STATS_RTOL, f"{scenario} {kind}[{name}]: rel {rel:.2e}"
    _assert_factors_close(ranks[0]["factors"], _pairs(factors), F32_OUT_ATOL)


def test_union_check_can_fail(results):
    """Rank 0's shard alone gives statistics far outside F64_STATS_RTOL of the all-reduced ones:
    the union check above is not vacuous (a missing all-reduce would fail it)."""
    config_name, dtype, *_ = worker.SHARDS["uneven64"]
    config = worker.CONFIGS[config_name]
    model = worker.model_for(dtype)
    targets = find_target_modules(model, config.target_modules)
    local = collect_statistics(model, worker.shard("uneven64", 0), targets, config, progress=False)
    got = _ok(results, "uneven64")[0]["stats"]
    worst = min(_rel(got[k][n], getattr(local, k)[n]) for k in ("Z", "G") for n in got[k])
    assert worst > 1e3 * F64_STATS_RTOL, worst


def test_float32_contiguous_shards_add_in_the_same_order(results):
    """Rank 0 sums b0..b3 in order, rank 1 holds b4: the all-reduce adds (((b0+b1)+b2)+b3) + b4,
    one process's order, and both run one thread: float32 statistics must be bitwise equal."""
    ranks = _ok(results, "contiguous32")
    stats, factors = _reference("contiguous32")
    for kind in ("Z", "Y", "G"):
        for name, ref in getattr(stats, kind).items():
            assert torch.equal(ranks[0]["stats"][kind][name], ref), f"{kind}[{name}]"
    _assert_factors_close(ranks[0]["factors"], _pairs(factors), F32_SOLVE_ATOL)


def test_float32_two_processes_match_one_process(results):
    """float32 statistics on interleaved shards (a different order of additions) give
    A@B within SHARDS_RTOL of one process on every layer: per-batch float32 products are the
    same, the running sums and the all-reduce are float64, every solve is float64."""
    ranks = _ok(results, "uneven32")
    _, factors = _reference("uneven32")
    for name, f in factors.items():
        A, B = (t.double() for t in ranks[0]["factors"][name][:2])
        ref = f.A.double() @ f.B.double()
        rel = _rel(A @ B, ref)
        assert rel <= SHARDS_RTOL, f"{name}: two processes vs one, A@B relative {rel:.2e}"


def test_float32_two_processes_measure_the_rounding_of_one_process(results):
    """The float64 sketches of the products are all-reduced with the sums: the rounding each
    statistic carries (``KFACStatistics.rounding``) is the single process's to SHARDS_RTOL
    (the sums differ by ~eps64, the rounding they measure is ~eps32 of them). A rank that left
    its sketches out of the all-reduce would measure its own shard's rounding against the
    union's statistics: off by the other shard's whole product."""
    ranks = _ok(results, "uneven32")
    stats, _ = _reference("uneven32")
    got = ranks[0]["stats"]["rounding"]
    assert got.keys() == stats.rounding.keys() and got
    for key, ref in stats.rounding.items():
        assert abs(got[key] - ref) <= SHARDS_RTOL * ref, f"{key}: {got[key]:.6g} vs {ref:.6g}"


def test_float32_two_processes_sum_the_float64_rows_diagonal_of_one_process(results):
    """The part of diag Z taken in float64 (rows above the ratio: both shards hold some here) is
    all-reduced with the sums: every rank has the single process's. A rank that left it out would
    keep its own shard's part (the union's is larger by the other shard's rows)."""
    ranks = _ok(results, "heavy32")
    stats, _ = _reference("heavy32")
    assert stats.heavy_diag and any(float(v.sum()) > 0 for v in stats.heavy_diag.values())
    for rank in ranks:
        got = rank["stats"]["heavy_diag"]
        assert got.keys() == stats.heavy_diag.keys()
        for key, ref in stats.heavy_diag.items():
            assert (
                _rel(got[key], ref) <= SHARDS_RTOL if float(ref.norm()) > 0 else not got[key].any()
            )


@pytest.mark.parametrize("scenario", list(worker.SHARDS))
def test_every_rank_has_bitwise_identical_results(results, scenario):
    r0, r1 = _ok(results, scenario)
    for name, tensors in r0["factors"].items():
        for t0, t1 in zip(tensors, r1["factors"][name], strict=True):
            assert torch.equal(t0, t1), f"{scenario} {name}"
    for kind in ("Z", "Y", "G"):
        for name, t in r0["stats"][kind].items():
            assert torch.equal(t, r1["stats"][kind][name]), f"{scenario} {kind}[{name}]"
    assert set(r0["owners"].values()) == {0, 1}, "the solves were not split over the ranks"
    assert r0["unchanged"] and r1["unchanged"], "a rank's model changed"


def test_rank_that_raises_fails_every_rank_fast(results):
    r0, r1 = _ok(results, "raise")
    assert r1["error_type"] == "RuntimeError" and worker.INJECTED in r1["message"]
    assert r0["error_type"] == "RankFailedError", r0
    assert "rank(s) [1]" in r0["message"] and worker.INJECTED in r0["message"], r0["message"]
    for r in (r0, r1):
        assert r["seconds"] < RAISE_LIMIT_S and r["unchanged"], r


def test_rank_that_raises_under_fsdp_fails_every_rank_within_the_timeout(results):
    r0, r1 = _ok(results, "raise_fsdp")
    assert r1["error_type"] == "RuntimeError" and worker.INJECTED in r1["message"]
    assert r0["error_type"] == "RankFailedError", r0
    assert "another rank failed" in r0["message"], r0["message"]
    for r in (r0, r1):
        assert r["seconds"] < FSDP_RAISE_LIMIT_S and r["unchanged"], r


def test_assign_layers_balances_whole_input_groups():
    model = worker.model_for(torch.float32)
    config = worker.CONFIGS["paper64"]
    targets = find_target_modules(model, config.target_modules)
    groups = {n: n for n in targets}
    for n in targets:  # q/k/v read one input, gate/up another
        for a, b in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
            if n.endswith(a):
                groups[n] = n[: -len(a)] + b
    owners = assign_layers(targets, groups, config, 2)
    assert all(owners[n] == owners[g] for n, g in groups.items()), "a Z group was split"
    assert set(owners.values()) == {0, 1}
    assert assign_layers(targets, groups, config, 1) == dict.fromkeys(targets, 0)
    assert owners == assign_layers(targets, groups, config, 2), "not deterministic"


def test_single_process_needs_no_group():
    assert resolve_process_group() is None
    with pytest.raises(TypeError, match="ProcessGroup"):
        resolve_process_group("world")


def test_torchrun_cli_writes_the_single_process_adapter(tmp_path):
    """The README's ``torchrun ... -m lora_da_ref init`` (2 gloo ranks, each every 2nd batch)."""
    from safetensors.torch import load_file

    assert cli_main(["make-tiny-model", str(tmp_path / "model")]) == 0
    lines = [json.dumps({"text": t}) + "\n" for t in TINY_TEXTS]
    (tmp_path / "calib.jsonl").write_text("".join(lines))
    common = ["init", "--model", "model", "--data", "calib.jsonl", "--rank", "4", "--no-progress"]
    common += ["--config", "paper_literal", "--dtype", "float64"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli_main([*common, "--out", "one"]) == 0
    finally:
        os.chdir(cwd)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd = [*launcher, "2", "-m", "lora_da_ref", *common, "--out", "two"]
    env = {**os.environ, "PYTHONPATH": cwd}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    pairs = {}
    for key in one:  # lora_A.weight = Aᵀ (r, d_in), lora_B.weight = Bᵀ (d_out, r)
        module, kind = key.rsplit(".lora_", 1)
        pairs.setdefault(module, {})[kind[0]] = (one[key].double().T, two[key].double().T)
    ref = {m: (p["A"][0], p["B"][0]) for m, p in pairs.items()}
    got = {m: (p["A"][1], p["B"][1]) for m, p in pairs.items()}
    _assert_factors_close(got, ref, F32_OUT_ATOL)
