"""FSDP lockstep: a model whose forward/backward run collectives (``fully_shard``) needs the same
number of steps on every rank; a rank with fewer usable batches pads with discarded steps.

The hooks see the full activations and output gradients (FSDP all-gathers the weights for each
forward/backward), so ``G`` comes from the hooks, never from the sharded ``weight.grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.distributed.collectives import all_reduce_int
from lora_da_ref.torch.progress import RunProgress
from lora_da_ref.torch.statistics import (
    Batch,
    KFACSums,
    LossFn,
    accumulate_statistics,
    default_loss_fn,
    model_guard,
    token_masks,
)

__all__ = ["lockstep_plan", "lockstep_sums", "runs_collectives"]


def runs_collectives(model: nn.Module) -> bool:
    """Whether the model's forward/backward issue collectives (FSDP2 ``fully_shard``, FSDP1)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


def lockstep_plan(
    shard: list[Batch], usable: int, config: LoraDAConfig, group: dist.ProcessGroup
) -> tuple[int, Batch | None]:
    """Steps per pass on every rank (the most usable batches of any rank) and a padding batch."""
    steps = all_reduce_int(usable, dist.ReduceOp.MAX, group)
    first = next((b for b in shard if token_masks(b, config)[1] > 0), None)
    return steps, _padding_batch(first, steps, group)


def lockstep_sums(
    model: nn.Module,
    shard: list[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    loss_fn: LossFn | None,
    progress: bool | RunProgress,
    pad: Batch | None,
    pad_steps: int,
) -> KFACSums:
    """The pass with the same number of forward/backward steps on every rank (FSDP collectives):
    after the pass's real steps, ``pad_steps`` padding steps on ``pad``."""
    try:
        sums = accumulate_statistics(
            model, shard, targets, config, loss_fn=loss_fn, progress=progress
        )
        _padding_steps(model, pad, targets, loss_fn, pad_steps)
    finally:
        _reshard(model)
    return sums


def _padding_batch(first: Batch | None, steps: int, group: dist.ProcessGroup) -> Batch | None:
    """A usable batch to pad with: this rank's first, else one broadcast from a rank that has one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    stranded = steps > 0 and first is None  # must pad but has nothing to pad with
    if not all_reduce_int(int(stranded), dist.ReduceOp.MAX, group):
        return first
    src = all_reduce_int(world if first is None else rank, dist.ReduceOp.MIN, group)
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


def _to_cpu(batch: Batch) -> Batch:
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in batch.items()}
