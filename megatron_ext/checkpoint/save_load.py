"""Saving and loading a run through megatron-core ``dist_checkpointing``: TP/PP/DP-invariant
on disk.

The layout under ``--save DIR`` is ``megatron_ext/checkpoint/layout.py``'s; one checkpoint holds
the model, optimizer, scheduler, the run state with the components' replicated state (in
``common.pt``), the components' sharded state (``components.<state_key>.…`` tensors) and
per-rank RNG states.

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished; the
latest-pointer is replaced after that. A crash at any point therefore leaves the previous
checkpoint and pointer intact. The optimizer state is saved reshardable, so a run can resume
under a different TP / PP / DP layout (the per-rank RNG states are then re-seeded).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint import FileSystemReader

from megatron_ext.checkpoint import manifest as manifest_lib
from megatron_ext.checkpoint.layout import (
    COMPONENTS_KEY,
    IN_PROGRESS_SUFFIX,
    CheckpointError,
    checkpoint_dir,
    saved_iterations,
    write_pointer,
)
from megatron_ext.checkpoint.optimizer_state import (
    load_optimizer_state,
    materialize_optimizer_state,
    optimizer_sharded_state_dict,
)
from megatron_ext.checkpoint.resume import choose_checkpoint
from megatron_ext.checkpoint.weights import (
    load_model_state,
    model_sharded_state_dict,
    read_run_state,
)
from megatron_ext.platform.collectives import (
    barrier,
    decided_by_rank0,
    failing_together,
    gather,
    is_rank0,
    world,
)

__all__ = ["CheckpointError", "PendingSave", "load_checkpoint", "save_checkpoint", "start_save"]

logger = logging.getLogger("gpas")


def _rank_tag() -> str:
    return (
        f"pp{parallel_state.get_pipeline_model_parallel_rank()}_"
        f"tp{parallel_state.get_tensor_model_parallel_rank()}_"
        f"dp{parallel_state.get_data_parallel_rank()}"
    )


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _failed(what: str):
    return lambda cause: CheckpointError(f"{what}: {cause}")


@dataclass
class PendingSave:
    """A checkpoint whose files are written (or being written by an async worker); ``finish``
    makes it the latest: manifest, rename, pointer, pruning."""

    root: str
    iteration: int
    keep_last: Optional[int]
    hashed: bool
    request: object = None  # megatron-core AsyncRequest while an async write is under way

    @property
    def final(self) -> str:
        return checkpoint_dir(self.root, self.iteration)

    @property
    def tmp(self) -> str:
        return self.final + IN_PROGRESS_SUFFIX

    def finish(self) -> int:
        """Collective; returns the checkpoint's size in bytes."""
        with failing_together(self.failure):  # a full disk while writing the manifest, say
            size = _write_manifest(self.tmp, self.iteration, self.hashed).total_bytes
        barrier()
        if is_rank0():
            if os.path.isdir(self.final):
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            write_pointer(self.root, self.iteration)
            if self.keep_last:
                _prune(self.root, self.keep_last, self.iteration)
        barrier()
        return size

    def discard(self) -> None:
        """Remove the partial directory (rank 0); the previous checkpoint and pointer stay."""
        if is_rank0():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def failure(self, cause: str) -> CheckpointError:
        """The write failed (on some rank): the partial directory goes, the error says what
        is left."""
        self.discard()
        return CheckpointError(
            f"could not write checkpoint {self.final}: {cause}; {self.what_survives()}"
        )

    def what_survives(self) -> str:
        previous = [i for i in saved_iterations(self.root) if i != self.iteration]
        if not previous:
            return "no earlier checkpoint exists under --save"
        return f"the previous checkpoint (iteration {previous[-1]}) and the pointer are intact"


def _write_manifest(directory: str, iteration: int, hashed: bool) -> manifest_lib.Manifest:
    """Collective: every rank describes (and hashes) its share of the files; rank 0 writes."""
    rank, size = world()
    files = decided_by_rank0(lambda: manifest_lib.list_files(directory))
    mine = manifest_lib.describe(directory, manifest_lib.shares(files, rank, size), hashed=hashed)
    entries = {}
    for part in gather(mine):
        entries.update(part)
    if rank == 0:
        return manifest_lib.write(directory, entries, hashed=hashed, iteration=iteration)
    return manifest_lib.Manifest(entries, hashed)


def start_save(
    root: str,
    iteration: int,
    chunks,
    optimizer,
    scheduler,
    run_state: dict,
    *,
    components_sharded: Optional[dict] = None,
    keep_last: Optional[int] = None,
    hashed: bool = True,
    async_save: bool = False,
) -> PendingSave:
    """Write a checkpoint into ``iter_XXXXXXX.tmp`` (collective). With ``async_save`` the shard
    files are written by megatron-core's async worker: the returned save's ``request`` is to be
    scheduled, and ``finish`` called once it is done on every rank."""
    pending = PendingSave(root, iteration, keep_last, hashed)
    with failing_together(_failed(f"could not create {pending.tmp}")):
        if is_rank0():
            shutil.rmtree(pending.tmp, ignore_errors=True)
            os.makedirs(pending.tmp)
    with failing_together(pending.failure):
        state = _state_to_save(chunks, optimizer, scheduler, run_state)
        if components_sharded:
            state[COMPONENTS_KEY] = components_sharded
        pending.request = dist_checkpointing.save(state, pending.tmp, async_sharded_save=async_save)
        if optimizer is not None:
            os.makedirs(os.path.join(pending.tmp, "rng"), exist_ok=True)
            torch.save(_rng_state(), os.path.join(pending.tmp, "rng", f"{_rank_tag()}.pt"))
    return pending


def _state_to_save(chunks, optimizer, scheduler, run_state: dict) -> dict:
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
        state["opt_param_scheduler"] = scheduler.state_dict()
    else:
        run_state = dict(run_state, weights_only=True)
    state["run_state"] = run_state
    return state


def save_checkpoint(
    root: str,
    iteration: int,
    chunks,
    optimizer,
    scheduler,
    run_state: dict,
    keep_last: Optional[int] = None,
    *,
    hashed: bool = True,
) -> str:
    """Save everything needed to resume exactly, and make it the latest (collective).

    With ``optimizer=None`` only the weights are written (``run_state["weights_only"]`` is set):
    such a checkpoint starts a run (e.g. one imported from Hugging Face) rather than resuming it.
    """
    pending = start_save(
        root, iteration, chunks, optimizer, scheduler, run_state, keep_last=keep_last, hashed=hashed
    )
    pending.finish()
    return pending.final


def _prune(root: str, keep_last: int, current: int) -> None:
    for it in saved_iterations(root)[:-keep_last]:
        if it != current:
            shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)


@dataclass(frozen=True)
class LoadedCheckpoint:
    directory: str
    run_state: dict


def load_checkpoint(
    root: str,
    chunks,
    optimizer,
    scheduler,
    *,
    load_optimizer: bool = True,
    on_damaged: str = "fallback",
    verify_hashes: bool = True,
) -> Optional[LoadedCheckpoint]:
    """Restore the newest intact checkpoint under ``root`` (None: none there)."""
    directory = choose_checkpoint(root, on_damaged=on_damaged, verify_hashes=verify_hashes)
    if directory is None:
        return None
    with failing_together(_failed(f"could not read checkpoint {directory}")):
        state = _read_checkpoint(directory, chunks, optimizer, scheduler, load_optimizer)
    return LoadedCheckpoint(directory, state)


def _read_checkpoint(directory: str, chunks, optimizer, scheduler, load_optimizer: bool) -> dict:
    if read_run_state(directory).get("weights_only") and load_optimizer:
        logger.info("%s holds weights only (no optimizer state); starting from them", directory)
        load_optimizer = False
    model_sd = model_sharded_state_dict(chunks)
    request = dict(model_sd)
    if load_optimizer:
        materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    state = dist_checkpointing.load(request, directory)
    load_model_state(chunks, state)
    if load_optimizer:
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["opt_param_scheduler"])
    rng_file = os.path.join(directory, "rng", f"{_rank_tag()}.pt")
    if load_optimizer and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif load_optimizer:
        logger.info(
            "no RNG state for %s in %s (layout changed); keeping the fresh seed",
            _rank_tag(),
            directory,
        )
    return state["run_state"]


def load_components_sharded(directory: str, sharded: dict) -> tuple[dict, list[str]]:
    """Collective: the components' sharded state from ``directory``; ``sharded`` is
    {state_key: its sharded state dict} as the components hand it over now. Returns the loaded
    states and the state keys the checkpoint holds nothing for (they start fresh)."""
    saved_keys = set(FileSystemReader(directory).read_metadata().state_dict_metadata)
    present = {k: v for k, v in sharded.items() if _keys(v) <= saved_keys}
    missing = sorted(set(sharded) - set(present))
    if not any(gather(bool(present))):  # the load is collective: all ranks or none
        return {}, missing
    with failing_together(_failed(f"could not read the components' state from {directory}")):
        loaded = dist_checkpointing.load({COMPONENTS_KEY: present}, directory)
    loaded = loaded.get(COMPONENTS_KEY, {})  # a rank with nothing to load gets nothing back
    return loaded, missing


def _keys(tree) -> set:
    if isinstance(tree, dict):
        return set().union(*(_keys(v) for v in tree.values())) if tree else set()
    if isinstance(tree, (list, tuple)):
        return set().union(*(_keys(v) for v in tree)) if tree else set()
    key = getattr(tree, "key", None)
    return {key} if key is not None else set()
