"""Data-parallel LoRA-DA on ``torch.distributed``: Algorithm 1 with the calibration set sharded.

Every statistic of Algorithm 1, step 1 is a sum over tokens divided by a count
(:mod:`lora_da_ref.torch.statistics`; paper orientation, ``W`` (d_in, d_out))::

    Z = Σ_{t∈P} x xᵀ / |P|,   Y = Σ_{t∈P} s sᵀ / |P|,   G = Σ_b w_b ∇_W L_b / Σ_b w_b.

With the calibration set ``S = S_0 ∪ … ∪ S_{R-1}`` split over ``R`` ranks,
``Σ_{t∈S} = Σ_r Σ_{t∈S_r}``: all-reducing (SUM) each rank's unnormalised :class:`KFACSums` —
``Z``, ``Y`` (full or diagonal), ``G``, the token / sample counts and ``Σ_b w_b``, in the
statistics dtype — *before* :func:`finalize` gives the single-process statistics of the union,
up to the order of floating-point additions.

Design (one call of :func:`init_lora_da_distributed` on every rank of the group):

1. **Pass.** Each rank runs the ordinary statistics pass on its own shard (``layers_per_pass``
   unchanged: one pass per group of layers). A plain replicated model runs no collectives in the
   pass. A model whose forward runs collectives (FSDP ``fully_shard``) runs in **lockstep**:
   every rank makes the same number of forward/backward steps per pass; a rank with fewer
   usable batches pads with extra steps whose statistics are discarded (its own first usable
   batch, or one broadcast from a rank that has one). The hooks see the full activations and
   output gradients (FSDP all-gathers the weights for each forward/backward), so ``G`` comes
   from the hooks, never from the sharded ``weight.grad``.
2. **All-reduce** of the sums and counts (:func:`all_reduce_sums`), bucketed in flat buffers.
3. **Layer-parallel solve + broadcast.** The input groups (modules sharing ``Z``: q/k/v,
   gate/up) are split over the ranks by a deterministic greedy balance of their solve cost
   (≈ ``d_in³``); each rank solves its share (:func:`lora_da_ref.torch.init.layer_factors`) and
   broadcasts ``A``, ``B`` and the eigenvalues. Chosen over "every rank solves every layer"
   because (a) the solves of a deep model run ``R`` times faster, and (b) the factors are
   **bitwise identical on every rank by construction** — a replicated solve is identical only
   if every rank's all-reduce result, BLAS/LAPACK build, thread count and GPU kernels agree.
4. **Errors.** After each stage (input check, pass, finalize, solves) every rank all-reduces a
   failure flag. When any rank failed, every rank raises: the failing rank its own exception,
   the others :class:`RankFailedError` naming the failed rank(s) and their messages. In a
   lockstep (FSDP) pass a failed rank re-raises at once without the flag exchange — its peers
   may be inside an FSDP collective, and a mismatched gloo collective aborts the process — and
   its peers fail when that collective errors or the group's timeout
   (``init_process_group(timeout=...)``) expires, with a :class:`RankFailedError` saying so.
   Each rank's model is restored in ``finally`` (requires_grad, train/eval modes, hooks;
   FSDP2 modules resharded).
"""

from __future__ import annotations

import atexit
import heapq
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora_da_ref.torch.config import LoraDAConfig, LoraFactors
from lora_da_ref.torch.statistics import (
    Batch,
    KFACStatistics,
    KFACSums,
    LossFn,
    accumulate_statistics,
    default_loss_fn,
    finalize,
    layer_passes,
    merge_passes,
    model_guard,
    token_masks,
)

__all__ = [
    "RankFailedError",
    "all_reduce_sums",
    "assign_layers",
    "collect_statistics_distributed",
    "init_lora_da_distributed",
    "join_torchrun_group",
    "resolve_process_group",
]

BUCKET_NUMEL = 1 << 24  # elements per flat all-reduce buffer (128 MiB in float64)


class RankFailedError(RuntimeError):
    """Another rank of the process group failed; this rank stops too (its model is unchanged)."""


def resolve_process_group(process_group: Any = None) -> dist.ProcessGroup | None:
    """The group to shard over: ``process_group`` if given, else the default group when one is
    initialised; ``None`` (single process) when there is none or it has one rank."""
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup, "
            f"got {type(process_group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return group if dist.get_world_size(group) > 1 else None


def join_torchrun_group() -> tuple[int, int]:
    """Join the default group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment); returns ``(rank, world_size)``, ``(0, 1)`` for a plain single process.

    The group is NCCL on CUDA (device ``LOCAL_RANK``) and gloo otherwise, and is destroyed at
    exit. An already initialised default group is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(_destroy_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_lora_da_distributed(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    group: dist.ProcessGroup,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, LoraFactors]:
    """Algorithm 1 (Theorem 4.2, Eqs. 17, 19, 21) with the calibration set sharded over ``group``.

    Called on every rank with that rank's shard ``batches`` (may be empty); ``targets`` (name →
    module) and ``config`` must be the same on every rank. Statistics are those of the union of
    the shards (module docstring); each rank solves a share of the layers (:func:`assign_layers`)
    and the factors are broadcast, so every rank returns bitwise-identical
    ``{name: LoraFactors}`` in model order, ``A`` (d_in, r), ``B`` (r, d_out).
    """
    from lora_da_ref.torch.factors import layer_factors

    stats = collect_statistics_distributed(
        model, batches, targets, config, group, loss_fn=loss_fn, progress=progress
    )
    owners = assign_layers(targets, stats.group_of, config, dist.get_world_size(group))
    mine: dict[str, LoraFactors] = {}
    with _all_ranks_or_none(group, "layer solve"):
        z_cache: dict[str, Any] = {}
        for name in targets:
            if owners[name] == dist.get_rank(group):
                mine[name] = layer_factors(stats, name, config, z_cache)
    return broadcast_factors(mine, owners, targets, config.rank, group)


def collect_statistics_distributed(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    group: dist.ProcessGroup,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> KFACStatistics:
    """Algorithm 1, step 1 over shards: ``finalize(all_reduce_sums(local sums))``.

    ``Z``, ``Y``, ``G`` of the union ``S = ∪_r S_r`` of every rank's ``batches`` ``S_r``; the
    same (bitwise) on every rank. Raises on every rank when any rank fails (module docstring).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("pass the wrapped module (ddp_model.module), not the DDP wrapper")
    show = progress and dist.get_rank(group) == 0
    lockstep = _runs_collectives(model)
    with _all_ranks_or_none(group, "input check"):  # local errors before any collective
        shard = as_shard(batches)
        usable = sum(token_masks(b, config)[1] > 0 for b in shard)  # batches the pass runs
    if lockstep:
        steps, pad = _lockstep_plan(shard, usable, config, group)
    with _all_ranks_or_none(group, "statistics pass", lockstep=lockstep):
        if lockstep:
            sums = _lockstep_sums(model, shard, targets, config, loss_fn, show, pad, steps - usable)
        else:
            sums = accumulate_statistics(
                model, shard, targets, config, loss_fn=loss_fn, progress=show
            )
    sums = all_reduce_sums(sums, targets, config, group)
    with _all_ranks_or_none(group, "finalize"):  # identical sums: all fail alike, or none
        stats = finalize(sums)
    return stats


def all_reduce_sums(
    sums: KFACSums, targets: dict[str, nn.Linear], config: LoraDAConfig, group: dist.ProcessGroup
) -> KFACSums:
    """SUM over ``group`` of every tensor and count of ``sums``, in place, in ``config.dtype``.

    ``Z[g] = Σ_r Σ_{t∈P_r} x xᵀ`` (d_in, d_in), ``Y[m]`` (d_out, d_out) or (d_out,),
    ``G[m] = Σ_r Σ_{b∈S_r} T_b ∇_W L_b`` (d_in, d_out), and ``tokens`` = Σ_r |P_r| etc. A rank
    that saw no tokens contributes zeros of the right shapes; the input groups (``group_of``)
    seen by the ranks must agree. Identical on every rank afterwards.
    """
    names = list(targets)
    sums.group_of = _agree_on_groups(sums.group_of, names, group)
    if sums.group_of:
        _fill_missing(sums, targets, config)
        tensors = [sums.Z[n] for n in names if sums.group_of[n] == n]
        tensors += [sums.Y[n] for n in names] + [sums.G[n] for n in names]
        _all_reduce_flat(tensors, group)
    _all_reduce_counts(sums, group)
    return sums


def assign_layers(
    targets: dict[str, nn.Linear], group_of: dict[str, str], config: LoraDAConfig, world_size: int
) -> dict[str, int]:
    """Owner rank of each target's solve: whole input groups (shared ``Z``, one Cholesky) go to
    the least-loaded rank, largest first (LPT); cost ≈ Σ_m (d_in³ + d_in² d_out [+ d_out³ for a
    full ``Y``]). Deterministic: the same on every rank."""
    cost: dict[str, int] = {}
    for name, m in targets.items():
        d_in, d_out = m.in_features, m.out_features
        full = d_out**3 if config.output_factor == "full" else 0
        key = group_of.get(name, name)
        cost[key] = cost.get(key, 0) + d_in**3 + d_in * d_in * d_out + full
    order = {key: i for i, key in enumerate(cost)}
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    owner_of_group: dict[str, int] = {}
    for key in sorted(cost, key=lambda k: (-cost[k], order[k])):
        load, rank = heapq.heappop(loads)
        owner_of_group[key] = rank
        heapq.heappush(loads, (load + cost[key], rank))
    return {name: owner_of_group[group_of.get(name, name)] for name in targets}


# --- the statistics pass ---------------------------------------------------------------------


def as_shard(batches: Iterable[Batch]) -> list[Batch]:
    """A rank's shard; unlike single-process init it may be empty (the union must not be)."""
    if isinstance(batches, dict):
        raise TypeError("batches must be an iterable of dicts, not a single dict")
    return list(batches)


def _runs_collectives(model: nn.Module) -> bool:
    """Whether the model's forward/backward issue collectives (FSDP2 ``fully_shard``, FSDP1)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


def _lockstep_plan(
    shard: list[Batch], usable: int, config: LoraDAConfig, group: dist.ProcessGroup
) -> tuple[int, Batch | None]:
    """Steps per pass on every rank (the most usable batches of any rank) and a padding batch."""
    steps = _all_reduce_int(usable, dist.ReduceOp.MAX, group)
    first = next((b for b in shard if token_masks(b, config)[1] > 0), None)
    return steps, _padding_batch(first, steps, group)


def _lockstep_sums(
    model: nn.Module,
    shard: list[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    loss_fn: LossFn | None,
    progress: bool,
    pad: Batch | None,
    pad_steps: int,
) -> KFACSums:
    """The pass with the same number of forward/backward steps on every rank (FSDP collectives):
    after each pass's real steps, ``pad_steps`` padding steps on ``pad``."""
    one_pass = replace(config, layers_per_pass=None)
    parts = []
    try:
        for names in layer_passes(list(targets), config.layers_per_pass):
            sub = {n: targets[n] for n in names}
            parts.append(
                accumulate_statistics(
                    model, shard, sub, one_pass, loss_fn=loss_fn, progress=progress
                )
            )
            _padding_steps(model, pad, sub, loss_fn, pad_steps)
    finally:
        _reshard(model)
    return merge_passes(parts)


def _padding_batch(first: Batch | None, steps: int, group: dist.ProcessGroup) -> Batch | None:
    """A usable batch to pad with: this rank's first, else one broadcast from a rank that has one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    stranded = steps > 0 and first is None  # must pad but has nothing to pad with
    if not _all_reduce_int(int(stranded), dist.ReduceOp.MAX, group):
        return first
    src = _all_reduce_int(world if first is None else rank, dist.ReduceOp.MIN, group)
    box = [_to_cpu(first) if rank == src else None]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return first if first is not None else box[0]


def _padding_steps(
    model: nn.Module, batch: Batch | None, targets: dict[str, nn.Linear], loss_fn: LossFn | None,
    count: int,
) -> None:  # fmt: skip
    """``count`` forward/backward steps whose statistics are discarded: the same collectives as a
    statistics step (the target outputs require grad, so FSDP's backward runs the same way)."""
    if count <= 0:
        return
    loss_fn = default_loss_fn if loss_fn is None else loss_fn
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    with model_guard(model), _outputs_require_grad(targets), torch.enable_grad():
        for _ in range(count):
            loss = loss_fn(model, batch)
            if loss.requires_grad:
                loss.backward()


@contextmanager
def _outputs_require_grad(targets: dict[str, nn.Linear]) -> Iterator[None]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if not output.requires_grad:
            output.requires_grad_(True)

    handles = [m.register_forward_hook(hook) for m in targets.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters (a local op) so an interrupted pass leaves none behind."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# --- collectives -------------------------------------------------------------------------------


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    """Where small bookkeeping tensors live: CPU for gloo, the current CUDA device otherwise."""
    if dist.get_backend(group) == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _all_reduce_int(value: int, op: dist.ReduceOp, group: dist.ProcessGroup) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def _agree_on_groups(
    group_of: dict[str, str], names: list[str], group: dist.ProcessGroup
) -> dict[str, str]:
    """The input groups seen by any rank (a rank without tokens saw none); they must agree."""
    index = {n: i for i, n in enumerate(names)}
    codes = torch.tensor([index[group_of[n]] if n in group_of else -1 for n in names])  # (m,)
    known = codes >= 0
    both = torch.cat([codes, torch.where(known, -codes, -len(names))]).to(_comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(names)].cpu(), -both[len(names) :].cpu()  # max and min known code
    if bool((high < 0).all()):
        return {}  # no rank saw a token: finalize raises the usual ValueError everywhere
    if bool((high < 0).any()) or not torch.equal(high, low):
        raise RuntimeError("the ranks disagree on which target modules share an input")
    return {n: names[int(c)] for n, c in zip(names, high, strict=True)}


def _fill_missing(sums: KFACSums, targets: dict[str, nn.Linear], config: LoraDAConfig) -> None:
    """Zeros for the statistics a rank never accumulated (its shard had no usable batch)."""
    device = next(iter(targets.values())).weight.device
    zeros = partial(torch.zeros, dtype=config.dtype, device=device)
    for name, m in targets.items():
        d_in, d_out = m.in_features, m.out_features
        if sums.group_of[name] == name and name not in sums.Z:
            sums.Z[name] = zeros(d_in, d_in)
        if name not in sums.Y:
            sums.Y[name] = zeros(d_out, d_out) if config.output_factor == "full" else zeros(d_out)
        if name not in sums.G:
            sums.G[name] = zeros(d_in, d_out)


def _all_reduce_counts(sums: KFACSums, group: dist.ProcessGroup) -> None:
    """SUM of every scalar field of :class:`KFACSums` (token / sample counts, gradient weight),
    in float64: exact for integers below 2⁵³."""
    scalars = [(f.name, type(f.default)) for f in fields(KFACSums) if f.default is not MISSING]
    values = [float(getattr(sums, name)) for name, _ in scalars]
    counts = torch.tensor(values, dtype=torch.float64, device=_comm_device(group))
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
    r: int,
    group: dist.ProcessGroup,
) -> dict[str, LoraFactors]:
    """Every owner broadcasts its layers' ``A`` (d_in, r), ``B`` (r, d_out), eigenvalues (r,) in
    one flat float32 buffer; the diagnostics follow as objects."""
    arrays: dict[str, list[Tensor]] = {}
    for src in range(dist.get_world_size(group)):
        names = [n for n in targets if owners[n] == src]
        if names:
            arrays |= _broadcast_layers(mine, names, targets, r, src, group)
    diagnostics = _gather_diagnostics(mine, owners, group)
    return {n: LoraFactors(*arrays[n], diagnostics[n]) for n in targets}


def _broadcast_layers(
    mine: dict[str, LoraFactors],
    names: list[str],
    targets: dict[str, nn.Linear],
    r: int,
    src: int,
    group: dist.ProcessGroup,
) -> dict[str, list[Tensor]]:
    shapes = [
        shape
        for n in names
        for shape in ((targets[n].in_features, r), (r, targets[n].out_features), (r,))
    ]
    sizes = [_numel(shape) for shape in shapes]
    device = _comm_device(group)
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


def _to_cpu(batch: Batch) -> Batch:
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in batch.items()}


# --- failure propagation -----------------------------------------------------------------------


@contextmanager
def _all_ranks_or_none(
    group: dist.ProcessGroup, stage: str, *, lockstep: bool = False
) -> Iterator[None]:
    """Run a stage; then all ranks learn whether any rank failed, and all raise if so.

    Without ``lockstep`` the stage is local (no collectives): the failing rank re-raises its own
    exception after the flag exchange, the others raise :class:`RankFailedError`. With
    ``lockstep`` (FSDP: collectives inside the stage) a failed rank must not start another
    collective — its peers may be waiting inside one, and a mismatched gloo collective aborts
    the process — so it re-raises at once; its peers fail when their pending collective errors
    or the group's timeout expires, and raise :class:`RankFailedError`.
    """
    try:
        yield
    except Exception as error:
        if lockstep:
            if _is_collective(error):
                raise _peer_failure(group, stage, error) from error
            raise
        try:
            _exchange_failures(group, stage, error)
        except Exception:  # the peers may already be gone; this rank's own error is the news
            pass
        raise
    try:
        _exchange_failures(group, stage, None)
    except RankFailedError:
        raise
    except Exception as error:  # a peer failed in lockstep and never reached the exchange
        if not _is_collective(error):
            raise
        raise _peer_failure(group, stage, error) from error


def _peer_failure(group: dist.ProcessGroup, stage: str, error: BaseException) -> RankFailedError:
    return RankFailedError(
        f"LoRA-DA {stage}: a collective failed on rank {dist.get_rank(group)} "
        f"({type(error).__name__}: {_short(error)}); most likely another rank failed or timed "
        "out (see its log). This rank's model is unchanged."
    )


def _exchange_failures(group: dist.ProcessGroup, stage: str, error: BaseException | None) -> None:
    world, me = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, dtype=torch.int32, device=_comm_device(group))
    flags[me] = int(error is not None)
    dist.all_reduce(flags, group=group)
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return
    messages: list[Any] = [None] * world
    mine = None if error is None else f"{type(error).__name__}: {_short(error)}"
    dist.all_gather_object(messages, mine, group=group)
    if error is None:
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailedError(
            f"LoRA-DA {stage} failed on rank(s) {failed} of {world} ({detail}); every rank "
            f"stops. Rank {me}'s model is unchanged."
        )


def _is_collective(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(key in text for key in ("gloo", "nccl", "timed out", "connection closed"))


def _short(error: BaseException, limit: int = 400) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " ..."
