"""Small collectives the checkpoint code agrees through; each works unchanged in one process
without a process group (the export tools read checkpoints that way)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_rank0() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather(value) -> list:
    """``value`` of every rank (a one-element list when not distributed)."""
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def agreed(fail: Callable[[str], Exception]):
    """Run the block on every rank; if it raised on any rank, raise ``fail(cause)`` (the first
    failing rank's cause, in one line) on every rank, so none is left waiting."""
    error = None
    try:
        yield
    except Exception as err:
        error = err
    causes = [c for c in gather(None if error is None else one_line(error)) if c]
    if causes:
        raise fail(causes[0]) from error
