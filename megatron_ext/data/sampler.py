"""Deterministic, resumable batch order for data-parallel training.

Global batch k holds dataset samples [k·B, (k+1)·B); each data-parallel rank takes its
contiguous share of micro-batches. The order is therefore a function of the sample index alone:
resuming from ``consumed_samples`` continues exactly, with any number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PretrainingBatchSampler:
    """Yields this rank's micro-batches of sample indices, starting at ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if total_samples <= 0:
            raise ValueError("no samples to draw from")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} ∉ [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = data_parallel_rank
        self.dp_size = data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (
            self.micro_batch_size * self.dp_size
        )

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples
        while start + step <= self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += step


def build_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 2,
) -> torch.utils.data.DataLoader:
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
