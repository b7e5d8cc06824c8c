"""Worker of tests/test_distributed.py: runs in each spawned rank of a 2-process gloo group.

Scenarios are data: :data:`SHARDS` says which batches each rank gets; the test computes the
single-process reference on the union of the same shards. Each rank saves its results (finalised
statistics, factors, or the error it raised and how long that took) to ``<out>/<scenario>_<rank>.pt``.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lora_da_ref.torch import LoraDAConfig, find_target_modules, init_lora_da
from lora_da_ref.torch.distributed import collect_statistics_distributed, resolve_process_group
from tests.tiny_models import make_tiny_llama
from tests.torch_cases import llama_batches

WORLD = 2
VOCAB = 50
GROUP_TIMEOUT_S = 60  # the default group: generous, the machine is shared (2 cores)
FAIL_TIMEOUT_S = 8  # the group of the FSDP failure scenario: its peer waits this long
INJECTED = "injected failure on rank 1"

CONFIGS = {
    "paper64": LoraDAConfig.paper_literal(rank=3, n_train=1000, dtype=torch.float64),
    "official32": LoraDAConfig.official(rank=3, solver="eigh", solver_options={}),
    "paper32": LoraDAConfig.paper_literal(
        rank=3, n_train=1000, diagnostics="full"
    ),  # float32 statistics, relative damping; the full tier measures the rounding
    "paper64_lpp1": LoraDAConfig.paper_literal(
        rank=3, n_train=1000, dtype=torch.float64, layers_per_pass=1
    ),
}


def all_batches() -> list[dict[str, torch.Tensor]]:
    """Batches 0-4 (different padding per batch) and batch 5, whose labels are all masked."""
    batches = llama_batches(n_batches=5, batch=2, seq=10, vocab=VOCAB, seed=7)
    masked = {k: v.clone() for k, v in batches[0].items()}
    masked["labels"].fill_(-100)
    return [*batches, masked]


# scenario: (config, model dtype, fsdp, shard of rank 0, shard of rank 1) -- indices into all_batches
SHARDS: dict[str, tuple[str, torch.dtype, bool, list[int], list[int]]] = {
    # uneven, interleaved (the summation order differs from one process), a masked batch on rank 1
    "uneven64": ("paper64", torch.float64, False, [0, 2, 3, 4], [1, 5]),
    # rank 1 has no unmasked token at all; one pass per layer (layers_per_pass=1)
    "zero64": ("paper64_lpp1", torch.float64, False, [0, 1, 2], [5, 5]),
    # float32 statistics, interleaved shards: A@B within 1e-6 of one process
    "uneven32": ("paper32", torch.float32, False, [0, 2, 3, 4], [1, 5]),
    # rank 1 holds only the last batch: ((b0+b1)+b2+b3) + b4 is one process's order of additions
    "contiguous32": ("official32", torch.float32, False, [0, 1, 2, 3], [4]),
    # FSDP-wrapped decoder layers, uneven shards, one pass per layer (lockstep padding per pass)
    "fsdp64": ("paper64_lpp1", torch.float64, True, [0, 2, 3, 4], [1, 5]),
    # FSDP, rank 1 has no usable batch: its padding batch is broadcast from rank 0
    "fsdp_zero64": ("paper64", torch.float64, True, [0, 1, 2], [5]),
    # uneven32 with rows above 1.5× the median ‖x‖² taken in float64 (HEAVY_ROW_RATIOS): both
    # shards hold some, so the float64 part of diag Z must be all-reduced with the sums
    "heavy32": ("paper32", torch.float32, False, [0, 2, 3, 4], [1, 5]),
}
# the statistics' HEAVY_ROW_RATIO of a scenario (else the library's)
HEAVY_ROW_RATIOS = {"heavy32": 1.5}


def shard(scenario: str, rank: int) -> list[dict[str, torch.Tensor]]:
    batches = all_batches()
    return [batches[i] for i in SHARDS[scenario][3 + rank]]


def union(scenario: str) -> list[dict[str, torch.Tensor]]:
    return shard(scenario, 0) + shard(scenario, 1)


def model_for(dtype: torch.dtype) -> torch.nn.Module:
    return make_tiny_llama(seed=3, dtype=dtype, hidden=32, layers=2, vocab=VOCAB)


def main(rank: int, init_file: str, out: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``."""
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timeout
    )
    try:
        for scenario in SHARDS:
            _save(out, scenario, rank, _guard(_run_scenario, scenario, rank))
        _save(out, "raise", rank, _guard(_run_raise, rank, fsdp=False))
        _save(out, "raise_fsdp", rank, _guard(_run_raise, rank, fsdp=True))
        dist.barrier()  # rank 1 stays alive: rank 0's FSDP collective must end by its timeout
    finally:
        dist.destroy_process_group()


def heavy_row_ratio(scenario: str) -> Any:
    """The scenario's ``HEAVY_ROW_RATIO`` in force (a context manager)."""
    from unittest import mock

    from lora_da_ref.torch import statistics

    ratio = HEAVY_ROW_RATIOS.get(scenario, statistics.HEAVY_ROW_RATIO)
    return mock.patch.object(statistics, "HEAVY_ROW_RATIO", ratio)


def _run_scenario(scenario: str, rank: int) -> dict[str, Any]:
    with heavy_row_ratio(scenario):
        return _run_scenario_as_set(scenario, rank)


def _run_scenario_as_set(scenario: str, rank: int) -> dict[str, Any]:
    config_name, dtype, fsdp, *_ = SHARDS[scenario]
    config = CONFIGS[config_name]
    model = model_for(dtype)
    if fsdp:
        _fully_shard(model, None)
    before = snapshot(model)
    targets = find_target_modules(model, config.target_modules)
    batches = shard(scenario, rank)
    group = resolve_process_group()
    stats = collect_statistics_distributed(model, batches, targets, config, group, progress=False)
    factors = init_lora_da(model, batches, config, progress=False)
    return {
        "stats": {
            "Z": stats.Z,
            "Y": stats.Y,
            "G": stats.G,
            "tokens": stats.tokens,
            "rounding": stats.rounding,
            "heavy_diag": stats.heavy_diag,
        },
        "factors": {n: (f.A, f.B, f.eigenvalues) for n, f in factors.items()},
        "owners": {n: f.diagnostics["solved_on_rank"] for n, f in factors.items()},
        "unchanged": snapshot(model) == before,
    }


def _run_raise(rank: int, *, fsdp: bool) -> dict[str, Any]:
    """Rank 1's loss_fn raises on its second batch, mid-pass; rank 0 must not hang."""
    group = None
    if fsdp:  # its own group with a short timeout: the peer of a failed FSDP collective waits
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=FAIL_TIMEOUT_S))
    model = model_for(torch.float32)
    if fsdp:
        _fully_shard(model, group)
    before = snapshot(model)
    calls = []

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError(INJECTED)
        return m(**batch).loss

    start = time.monotonic()
    try:
        init_lora_da(
            model, all_batches()[:3], CONFIGS["official32"], loss_fn=loss_fn, progress=False,
            process_group=group,
        )  # fmt: skip
        error = None
    except Exception as exc:
        error = exc
    return {
        "error_type": None if error is None else type(error).__name__,
        "message": "" if error is None else str(error),
        "seconds": time.monotonic() - start,
        "unchanged": snapshot(model) == before,
    }


def _fully_shard(model: torch.nn.Module, group: dist.ProcessGroup | None) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if group is None:
        mesh = init_device_mesh("cpu", (WORLD,))
    else:
        mesh = DeviceMesh.from_group(group, "cpu")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Weights (this rank's local shards), requires_grad, train/eval flags, hook counts."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        "weights": {
            n: _local(p).detach().clone().numpy().tobytes() for n, p in model.named_parameters()
        },
        "grads": {n: p.grad is None for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: tuple(len(getattr(m, h)) for h in hooks) for n, m in model.named_modules()},
    }


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _guard(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except Exception:
        return {"crash": traceback.format_exc()}


def _save(out: str, scenario: str, rank: int, result: dict[str, Any]) -> None:
    torch.save(result, Path(out) / f"{scenario}_{rank}.pt")
