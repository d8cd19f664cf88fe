"""The run's datasets from its resolved configuration: one function, so that training and
``pretrain_gpas.py --prepare-data-only`` build (or find) exactly the same index cache; and the
loaders that feed them to the steps and the evaluations."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Optional

from megatron.core import parallel_state

from megatron_ext.config import RunConfig
from megatron_ext.data.datasets import build_datasets
from megatron_ext.data.sampler import build_data_loader
from megatron_ext.planning import preflight


def validation_samples(cfg: RunConfig, global_batch_size: int) -> Optional[int]:
    """Samples the evaluations read over the run (None: per-document mode reads the validation
    split's documents as they are)."""
    if cfg.data.data_mode == "per-document":
        return None
    evals = cfg.optim.train_iters // cfg.eval.eval_interval + 1
    return evals * cfg.eval.eval_iters * global_batch_size


def run_datasets(
    cfg: RunConfig,
    global_batch_size: int,
    eod: int,
    say: Optional[Callable[[str], None]] = None,
):
    """(train, valid) for ``cfg`` (a resolved configuration: its vocabulary and iterations are
    final); ``say`` gets the line of an index build."""
    train, valid, _ = build_datasets(
        cfg.data,
        seq_length=cfg.model.seq_length,
        seed=cfg.optim.seed,
        vocab_size=cfg.model.vocab_size,
        eod_id=eod,
        num_samples=[
            cfg.optim.train_iters * global_batch_size,
            validation_samples(cfg, global_batch_size),
            0,
        ],
        is_built_on_rank=lambda: True,  # every rank reads its own batches (no TP broadcast)
        say=say,
    )
    return train, valid


def prepare_data(run, say: Callable[[str], None]) -> None:
    """Build the run's packed index cache in this process, before the job: training then finds
    it and starts its data in seconds. ``run`` is a :class:`ResolvedRun` of the job's layout."""
    cfg = run.cfg
    mode = "mock" if cfg.data.mock_data else cfg.data.data_mode
    if mode != "packed":
        say(f"data: {mode} mode builds no index (its order is computed per sample): nothing to "
            "prepare")  # fmt: skip
        return
    start = time.perf_counter()
    train, valid = run_datasets(cfg, run.global_batch_size, run.eod, say=say)
    for name, dataset in (("train", train), ("valid", valid)):
        if dataset is not None:
            say(f"data: {name} index ready: {len(dataset):,} samples")
    say(f"data: prepared in {time.perf_counter() - start:.1f} s for a global batch of "
        f"{run.global_batch_size} × {cfg.optim.train_iters:,} iterations; training with the "
        "same flags finds it")  # fmt: skip


class RunData:
    """The run's batches for this rank: ``train`` (one iterator per model chunk, from
    ``consumed_samples`` on) and :meth:`validation` (a fresh pass each time; None without a
    validation split). Datasets made before sidecars existed get their token ids checked batch
    by batch."""

    def __init__(self, run, consumed_samples: int, num_chunks: int, say=None):
        cfg = run.cfg
        self.cfg, self.num_chunks = cfg, num_chunks
        self.undescribed = list(run.undescribed_data)
        self.train_ds, self.valid_ds = run_datasets(cfg, run.global_batch_size, run.eod, say=say)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        loader = build_data_loader(
            self.train_ds,
            consumed_samples,
            cfg.optim.micro_batch_size,
            self.dp_rank,
            self.dp,
            num_workers=cfg.num_workers,
        )
        self.train = self._per_chunk(iter(loader))
        self.validation = self._validation if self.valid_ds is not None else None

    def _validation(self) -> list:
        mbs = self.cfg.optim.micro_batch_size
        loader = build_data_loader(self.valid_ds, 0, mbs, self.dp_rank, self.dp, num_workers=0)
        return self._per_chunk(iter(loader))

    def _per_chunk(self, iterator) -> list:
        if self.undescribed:
            iterator = preflight.checked_batches(
                iterator, self.cfg.model.vocab_size, self.undescribed
            )
        if self.num_chunks == 1:
            return [iterator]
        return list(itertools.tee(iterator, self.num_chunks))
