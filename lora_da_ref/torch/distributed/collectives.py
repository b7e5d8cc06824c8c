"""The collectives of data-parallel LoRA-DA: summing statistics, broadcasting factors.

Every statistic of Algorithm 1, step 1 is a sum over tokens divided by a count, so all-reducing
(SUM) each rank's unnormalised :class:`~lora_da_ref.torch.statistics.KFACSums` *before*
``finalize`` gives the statistics of the union of the shards (up to the order of additions).
Paper orientation: ``A`` (d_in, r), ``B`` (r, d_out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    StatisticsConfig,
    statistics_config_of,
)
from lora_da_ref.torch.statistics import (
    ROUNDING_PROBES,
    RUNNING_SUM_DTYPE,
    KFACSums,
    records_heavy_rows,
)

__all__ = ["BUCKET_NUMEL", "all_reduce_int", "all_reduce_sums", "broadcast_factors", "comm_device"]

BUCKET_NUMEL = 1 << 24  # elements per flat all-reduce buffer (128 MiB in float64)


def all_reduce_sums(
    sums: KFACSums,
    targets: dict[str, nn.Linear],
    config: StatisticsConfig | LoraDAConfig,
    group: dist.ProcessGroup,
) -> KFACSums:
    """SUM over ``group`` of every tensor and count of ``sums``, in place, in float64 (the running
    sums' dtype, :data:`~lora_da_ref.torch.statistics.RUNNING_SUM_DTYPE`).

    ``Z[g] = Σ_r Σ_{t∈P_r} x xᵀ`` (d_in, d_in), ``Y[m]`` (d_out, d_out) or (d_out,),
    ``G[m] + G_odd[m] = Σ_r Σ_{b∈S_r} T_b ∇_W L_b`` (d_in, d_out; ``G_odd`` with split sums), the float64 sketches ``rounding``
    when the pass measures its rounding, the float64 part of diag Z (``heavy_diag``), and
    ``tokens`` = Σ_r |P_r| etc. A rank
    that saw no tokens contributes zeros of the right shapes; the input groups (``group_of``)
    seen by the ranks must agree. Identical on every rank afterwards.
    """
    config = statistics_config_of(config)
    names = list(targets)
    sums.group_of = _agree_on_groups(sums.group_of, names, group)
    if sums.group_of:
        _fill_missing(sums, targets, config)
        tensors = [sums.Z[n] for n in names if sums.group_of[n] == n]
        tensors += [sums.Y[n] for n in names] + [sums.G[n] for n in names]
        tensors += [sums.G_odd[n] for n in names] if config.split_halves else []
        tensors += [sums.rounding[k] for k in _rounding_keys(sums, names)]
        tensors += [sums.heavy_diag[n] for n in names if n in sums.heavy_diag]
        _all_reduce_flat(tensors, group)
    _all_reduce_counts(sums, group)
    return sums


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Where small bookkeeping tensors live: CPU for gloo, the current CUDA device otherwise."""
    if dist.get_backend(group) == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_int(value: int, op: dist.ReduceOp, group: dist.ProcessGroup) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def _agree_on_groups(
    group_of: dict[str, str], names: list[str], group: dist.ProcessGroup
) -> dict[str, str]:
    """The input groups seen by any rank (a rank without tokens saw none); they must agree."""
    index = {n: i for i, n in enumerate(names)}
    codes = torch.tensor([index[group_of[n]] if n in group_of else -1 for n in names])  # (m,)
    known = codes >= 0
    both = torch.cat([codes, torch.where(known, -codes, -len(names))]).to(comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(names)].cpu(), -both[len(names) :].cpu()  # max and min known code
    if bool((high < 0).all()):
        return {}  # no rank saw a token: finalize raises the usual ValueError everywhere
    if bool((high < 0).any()) or not torch.equal(high, low):
        raise RuntimeError("the ranks disagree on which target modules share an input")
    return {n: names[int(c)] for n, c in zip(names, high, strict=True)}


def _fill_missing(sums: KFACSums, targets: dict[str, nn.Linear], config: StatisticsConfig) -> None:
    """Zeros for the statistics a rank never accumulated (its shard had no usable batch)."""
    device = next(iter(targets.values())).weight.device
    zeros = partial(torch.zeros, dtype=RUNNING_SUM_DTYPE, device=device)
    for name, m in targets.items():
        d_in, d_out = m.in_features, m.out_features
        if sums.group_of[name] == name and name not in sums.Z:
            sums.Z[name] = zeros(d_in, d_in)
        if name not in sums.Y:
            sums.Y[name] = zeros(d_out, d_out) if config.output_factor == "full" else zeros(d_out)
        if name not in sums.G:
            sums.G[name] = zeros(d_in, d_out)
        if config.split_halves and name not in sums.G_odd:  # a shard may hold no odd sequence
            sums.G_odd[name] = zeros(d_in, d_out)
        if records_heavy_rows(config) and sums.group_of[name] == name:
            sums.heavy_diag.setdefault(name, zeros(d_in))
    if not config.records_rounding:
        return
    k = ROUNDING_PROBES
    for name, m in targets.items():  # the float64 sketches of the products (statistics.py)
        shapes = {
            f"Z/{name}": (m.in_features, k) if sums.group_of[name] == name else None,
            f"Y/{name}": (m.out_features,) + ((k,) if config.output_factor == "full" else ()),
            f"G/{name}": (m.in_features, k),
        }
        for key, shape in shapes.items():
            if shape is not None and key not in sums.rounding:
                sums.rounding[key] = zeros(*shape)


def _rounding_keys(sums: KFACSums, names: list[str]) -> list[str]:
    """The keys of ``sums.rounding`` in an order every rank agrees on."""
    order = [f"{kind}/{n}" for n in names for kind in ("Z", "Y", "G")]
    return [key for key in order if key in sums.rounding]


def _all_reduce_counts(sums: KFACSums, group: dist.ProcessGroup) -> None:
    """SUM of every scalar field of :class:`KFACSums` (token / sample counts, gradient weight),
    in float64: exact for integers below 2⁵³."""
    scalars = [  # the counts (the products' dtype is the same on every rank)
        (f.name, type(f.default))
        for f in fields(KFACSums)
        if f.default is not MISSING and isinstance(f.default, int | float)
    ]
    values = [float(getattr(sums, name)) for name, _ in scalars]
    counts = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(counts, group=group)
    for (name, kind), value in zip(scalars, counts.tolist(), strict=True):
        setattr(sums, name, round(value) if kind is int else kind(value))


def _all_reduce_flat(tensors: list[Tensor], group: dist.ProcessGroup) -> None:
    """SUM-all-reduce ``tensors`` in place, packed into flat buffers of ≤ BUCKET_NUMEL elements."""
    bucket: list[Tensor] = []
    for t in tensors:
        if bucket and (
            sum(b.numel() for b in bucket) + t.numel() > BUCKET_NUMEL
            or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)
        ):
            _all_reduce_bucket(bucket, group)
            bucket = []
        bucket.append(t)
    if bucket:
        _all_reduce_bucket(bucket, group)


def _all_reduce_bucket(bucket: list[Tensor], group: dist.ProcessGroup) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])  # (Σ numel,)
    dist.all_reduce(flat, group=group)
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
        t.copy_(part.view_as(t))


def broadcast_factors(
    mine: dict[str, LoraFactors],
    owners: dict[str, int],
    targets: dict[str, nn.Linear],
    ranks: Mapping[str, int],
    group: dist.ProcessGroup,
) -> dict[str, LoraFactors]:
    """Every owner broadcasts its layers' ``A`` (d_in, r), ``B`` (r, d_out), eigenvalues (r,) in
    one flat float32 buffer (``r = ranks[name]``); the diagnostics follow as objects."""
    arrays: dict[str, list[Tensor]] = {}
    for src in range(dist.get_world_size(group)):
        names = [n for n in targets if owners[n] == src]
        if names:
            arrays |= _broadcast_layers(mine, names, targets, ranks, src, group)
    diagnostics = _gather_diagnostics(mine, owners, group)
    return {n: LoraFactors(*arrays[n], diagnostics[n]) for n in targets}


def _broadcast_layers(
    mine: dict[str, LoraFactors],
    names: list[str],
    targets: dict[str, nn.Linear],
    ranks: Mapping[str, int],
    src: int,
    group: dist.ProcessGroup,
) -> dict[str, list[Tensor]]:
    shapes = [
        shape
        for n in names
        for shape in (
            (targets[n].in_features, ranks[n]),
            (ranks[n], targets[n].out_features),
            (ranks[n],),
        )
    ]
    sizes = [_numel(shape) for shape in shapes]
    device = comm_device(group)
    if dist.get_rank(group) == src:
        parts = [t.reshape(-1) for n in names for t in (mine[n].A, mine[n].B, mine[n].eigenvalues)]
        flat = torch.cat(parts).to(device)  # (Σ sizes,)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dist.broadcast(flat, group=group, group_src=src)
    pieces = [
        p.view(shape).clone() for p, shape in zip(flat.cpu().split(sizes), shapes, strict=True)
    ]
    return {n: pieces[3 * i : 3 * i + 3] for i, n in enumerate(names)}


def _gather_diagnostics(
    mine: dict[str, LoraFactors], owners: dict[str, int], group: dist.ProcessGroup
) -> dict[str, dict[str, Any]]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {n: f.diagnostics for n, f in mine.items()}, group=group)
    merged = {n: d for part in gathered for n, d in part.items()}
    return {n: {**merged[n], "solved_on_rank": owners[n]} for n in owners}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
