"""Will the next checkpoint fit: its expected size and the free space under ``--save``."""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.checkpoint.manifest import human_bytes
from megatron_ext.platform.collectives import collective_device, decided_by_rank0


def _free_bytes(path: str) -> int:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def check_free_space(root: str, needed: int, what: str) -> None:
    """Collective: refuse with one line giving both numbers when the filesystem of ``root`` has
    less than ``needed`` bytes free (decided on rank 0, so every rank agrees)."""

    def shortage() -> Optional[str]:
        free = _free_bytes(root)
        if free >= needed:
            return None
        return (
            f"--save {root}: {human_bytes(free)} free, {what} needs about "
            f"{human_bytes(needed)}; free space there (or lower "
            "--keep-last-checkpoints), or point --save at a larger filesystem"
        )

    problem = decided_by_rank0(shortage)
    if problem:
        raise CheckpointError(problem)


def estimate_checkpoint_bytes(chunks, bf16: bool) -> int:
    """Collective: a checkpoint's size before the first one exists: each parameter once, with
    its Adam moments (and fp32 main copy under bf16). The size of the last checkpoint written
    replaces it from then on."""
    local = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    numel = sum(p.numel() for c in chunks for p in c.parameters())
    total = torch.tensor(
        [local + numel * (12 if bf16 else 8)], dtype=torch.float64, device=collective_device()
    )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        total /= parallel_state.get_data_parallel_world_size()
    return int(total.item())
