"""Failure propagation: when any rank fails a stage, every rank raises (none hangs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from lora_da_ref.torch.distributed.collectives import comm_device

__all__ = ["RankFailedError", "all_ranks_or_none"]


class RankFailedError(RuntimeError):
    """Another rank of the process group failed; this rank stops too (its model is unchanged)."""


@contextmanager
def all_ranks_or_none(
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
    flags = torch.zeros(world, dtype=torch.int32, device=comm_device(group))
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
