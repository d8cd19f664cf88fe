"""The run's datasets from its resolved configuration: one function, so that training and
``pretrain_gpas.py --prepare-data-only`` build (or find) exactly the same index cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

from megatron_ext.config import RunConfig
from megatron_ext.data.datasets import build_datasets


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
