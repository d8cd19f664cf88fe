"""Small collectives the run agrees through. Each works unchanged in one process without a
process group (the export tools read checkpoints that way)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def collective_device() -> torch.device:
    """Where tensors handed to collectives live: the GPU when there is one (NCCL), else the CPU
    (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """Collective: ``decide()`` runs on rank 0 alone and every rank returns its answer (a small
    picklable value), so that all ranks act on one decision. If ``decide()`` raises, rank 0
    raises that error and every other rank a :class:`RuntimeError` naming it: none is left
    waiting."""
    if not torch.distributed.is_initialized():
        return decide()
    answer: list[Any] = [None]
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            answer[0] = (True, decide())
        except Exception as err:  # noqa: BLE001 - raised below, after the others learn of it
            error, answer[0] = err, (False, one_line(err))
    torch.distributed.broadcast_object_list(answer, src=0)
    decided, value = answer[0]
    if error is not None:
        raise error
    if not decided:
        raise RuntimeError(f"rank 0 failed to decide: {value}")
    return value


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank if it is True on any. Asked once per step: on one rank it
    asks nothing of the device (on a GPU, the flag's copy and its read would each wait for the
    queued kernels)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def failing_together(fail: Callable[[str], Exception]):
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
