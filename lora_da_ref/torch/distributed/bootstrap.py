"""Joining a ``torch.distributed`` process group: ``torchrun`` bootstrap and group resolution."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["join_torchrun_group", "resolve_process_group"]


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
