"""Data-parallel LoRA-DA statistics: 1 vs 2 gloo processes on CPU for a fixed calibration set.

For a fixed total calibration set (split evenly over the ranks) it times, per rank:

* ``pass_s``: the local statistics pass (``accumulate_statistics`` on the rank's shard);
* ``wait_s``: a barrier after the pass (load imbalance between the ranks);
* ``all_reduce_s``: :func:`lora_da_ref.torch.distributed.all_reduce_sums` (Z, Y, G, counts);
* ``solve_s``: the layer solves this rank owns (:func:`assign_layers`), then ``broadcast_s``;
* ``init_s``: one whole :func:`init_lora_da` call (a second pass; the stages above are separate).

``all_reduce_fraction`` = all_reduce_s / pass_s. Median over ``--repeats``. Every process runs one
thread (on a shared, oversubscribed machine OpenMP threads stall). The 1-process row runs
without a group (all-reduce and broadcast are then absent). CUDA with several devices is not
measured: the script is CPU/gloo only, and the JSON's ``cuda`` field says why it was skipped.

Usage: ``python benchmarks/distributed_scaling.py [--quick] [--out result.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_da_ref.data import tiny_llama
from lora_da_ref.torch import LoraDAConfig, find_target_modules, init_lora_da
from lora_da_ref.torch import distributed as D
from lora_da_ref.torch.factors import solve_layer
from lora_da_ref.torch.statistics import accumulate_statistics, finalize

SEED = 0
SIZES = {  # model and calibration set: full and --quick
    "full": {"hidden": 256, "layers": 4, "batches": 32, "batch": 4, "seq": 64, "vocab": 512},
    "quick": {"hidden": 64, "layers": 2, "batches": 4, "batch": 2, "seq": 16, "vocab": 128},
}


def calibration(size: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(size["batches"]):
        ids = torch.randint(3, size["vocab"], (size["batch"], size["seq"]), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def measure(rank: int, world: int, size: dict[str, int], repeats: int) -> dict[str, Any]:
    """Stage timings of this rank (median over repeats)."""
    model = tiny_llama(SEED, hidden=size["hidden"], layers=size["layers"], vocab=size["vocab"])
    config = LoraDAConfig.official(rank=8)
    targets = find_target_modules(model, config.target_modules)
    shard = calibration(size)[rank::world]
    group = D.resolve_process_group()
    runs = [_stages(model, shard, targets, config, group) for _ in range(repeats)]
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out["all_reduce_fraction"] = out["all_reduce_s"] / out["pass_s"]
    out["tokens_on_rank"] = sum(int(b["attention_mask"].sum()) for b in shard)
    return out


def _stages(model, shard, targets, config, group) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    sums = accumulate_statistics(model, shard, targets, config, progress=False)
    t["pass_s"] = time.perf_counter() - start
    t["wait_s"] = t["all_reduce_s"] = t["broadcast_s"] = 0.0
    if group is not None:
        start = time.perf_counter()
        dist.barrier(group)
        t["wait_s"] = time.perf_counter() - start
        start = time.perf_counter()
        sums = D.all_reduce_sums(sums, targets, config, group)
        t["all_reduce_s"] = time.perf_counter() - start
    stats = finalize(sums)
    world = 1 if group is None else dist.get_world_size(group)
    me = 0 if group is None else dist.get_rank(group)
    owners = D.assign_layers(targets, stats.group_of, config, world)
    start = time.perf_counter()
    cache: dict[str, Any] = {}
    mine = {n: solve_layer(stats, n, config, cache).factors() for n in targets if owners[n] == me}
    t["solve_s"] = time.perf_counter() - start
    if group is not None:
        start = time.perf_counter()
        D.broadcast_factors(mine, owners, targets, dict.fromkeys(targets, config.rank), group)
        t["broadcast_s"] = time.perf_counter() - start
    start = time.perf_counter()
    init_lora_da(model, shard, config, progress=False, process_group=group)
    t["init_s"] = time.perf_counter() - start
    return t


def _worker(rank: int, world: int, init_file: str, out: str, size: dict, repeats: int) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=600)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout
    )
    try:
        result = measure(rank, world, size, repeats)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_world(world: int, size: dict[str, int], repeats: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, f"{tmp}/init", tmp, size, repeats), nprocs=world)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    torch.set_num_threads(1)  # one thread per process: 1 process = 1 core, 2 processes = 2 cores
    rows = [
        {"processes": 1, "ranks": [measure(0, 1, size, args.repeats)]},
        {"processes": 2, "ranks": run_world(2, size, args.repeats)},
    ]
    result = {
        "benchmark": "distributed_scaling",
        "device": "cpu",
        "backend": "gloo",
        "cuda": f"skipped: {torch.cuda.device_count()} CUDA device(s); this script measures CPU/gloo",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": size,
        "total_tokens": size["batches"] * size["batch"] * size["seq"],
        "repeats": args.repeats,
        "threads_per_process": 1,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
