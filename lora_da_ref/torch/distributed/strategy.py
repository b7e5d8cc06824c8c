"""The data-parallel :class:`~lora_da_ref.torch.pipeline.Strategy`: shards in, identical factors out.

Paper orientation, ``W`` (d_in, d_out). ``collect`` runs the ordinary statistics pass on this
rank's shard (in FSDP lockstep when the model's forward runs collectives), ``reduce`` all-reduces
the sums and counts before ``finalize``, ``plan`` gives whole input groups (shared ``Z``) to ranks
by a deterministic greedy balance of their solve cost, and ``gather`` broadcasts each owner's
factors. Every local stage runs under :func:`all_ranks_or_none`: a failure anywhere fails every
rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

import torch.distributed as dist
from torch import nn

from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    StatisticsConfig,
    statistics_config_of,
)
from lora_da_ref.torch.distributed.collectives import all_reduce_sums, broadcast_factors
from lora_da_ref.torch.distributed.failures import all_ranks_or_none
from lora_da_ref.torch.distributed.lockstep import lockstep_plan, lockstep_sums, runs_collectives
from lora_da_ref.torch.pipeline import run_pipeline
from lora_da_ref.torch.progress import RunProgress
from lora_da_ref.torch.statistics import (
    Batch,
    KFACStatistics,
    KFACSums,
    LossFn,
    accumulate_statistics,
    finalize,
    materialise_batches,
    token_masks,
)

__all__ = [
    "DataParallel",
    "assign_layers",
    "collect_statistics_distributed",
    "init_lora_da_distributed",
]

Targets = dict[str, nn.Linear]


class DataParallel:
    """Strategy over a process group: each rank holds a shard (possibly empty) of the batches."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def prepare(self, batches: Iterable[Batch]) -> list[Batch]:
        with all_ranks_or_none(self.group, "input check"):  # a shard may be empty, not the union
            return materialise_batches(batches, allow_empty=True)

    def collect(
        self, model: nn.Module, batches: list[Batch], targets: Targets, config: StatisticsConfig,
        loss_fn: LossFn | None, progress: bool | RunProgress,
    ) -> KFACSums:  # fmt: skip
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the wrapped module (ddp_model.module), not the DDP wrapper")
        show = progress if self.rank == 0 else False  # the pipeline's bar is disabled off rank 0
        lockstep = runs_collectives(model)
        if lockstep:
            usable = sum(token_masks(b, config)[1] > 0 for b in batches)  # batches the pass runs
            steps, pad = lockstep_plan(batches, usable, config, self.group)
        with all_ranks_or_none(self.group, "statistics pass", lockstep=lockstep):
            if lockstep:
                return lockstep_sums(
                    model, batches, targets, config, loss_fn, show, pad, steps - usable
                )
            return accumulate_statistics(
                model, batches, targets, config, loss_fn=loss_fn, progress=show
            )

    def reduce(self, sums: KFACSums, targets: Targets, config: StatisticsConfig) -> KFACStatistics:
        sums = all_reduce_sums(sums, targets, config, self.group)
        with all_ranks_or_none(self.group, "finalize"):  # identical sums: all fail alike, or none
            return finalize(sums)

    def plan(
        self, targets: Targets, group_of: dict[str, str], config: StatisticsConfig
    ) -> dict[str, int]:
        return assign_layers(targets, group_of, config, dist.get_world_size(self.group))

    def stage(self, name: str) -> AbstractContextManager[None]:
        return all_ranks_or_none(self.group, name)

    def gather(
        self, mine: dict[str, LoraFactors], owners: dict[str, int], targets: Targets,
        ranks: Mapping[str, int],
    ) -> dict[str, LoraFactors]:  # fmt: skip
        return broadcast_factors(mine, owners, targets, ranks, self.group)


def init_lora_da_distributed(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Targets,
    config: LoraDAConfig,
    group: dist.ProcessGroup,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, LoraFactors]:
    """Algorithm 1 (Theorem 4.2, Eqs. 17, 19, 21) with the calibration set sharded over ``group``:
    :func:`~lora_da_ref.torch.pipeline.run_pipeline` with the :class:`DataParallel` strategy.

    Called on every rank with that rank's shard ``batches`` (may be empty); ``targets`` (name →
    module) and ``config`` must be the same on every rank. Every rank returns bitwise-identical
    ``{name: LoraFactors}`` in model order, ``A`` (d_in, r), ``B`` (r, d_out).
    """
    strategy = DataParallel(group)
    return run_pipeline(
        model, batches, targets, config, strategy, loss_fn=loss_fn, progress=progress
    )


def collect_statistics_distributed(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Targets,
    config: StatisticsConfig | LoraDAConfig,
    group: dist.ProcessGroup,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> KFACStatistics:
    """Algorithm 1, step 1 over shards: ``finalize(all_reduce_sums(local sums))``.

    ``Z``, ``Y``, ``G`` of the union ``S = ∪_r S_r`` of every rank's ``batches`` ``S_r``; the
    same (bitwise) on every rank. Raises on every rank when any rank fails.
    """
    config = statistics_config_of(config)
    strategy = DataParallel(group)
    shard = strategy.prepare(batches)
    sums = strategy.collect(model, shard, targets, config, loss_fn, progress)
    return strategy.reduce(sums, targets, config)


def assign_layers(
    targets: Targets, group_of: dict[str, str], config: StatisticsConfig, world_size: int
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
