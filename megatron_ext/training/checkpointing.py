"""Checkpoints through megatron-core ``dist_checkpointing``: TP/PP/DP-invariant on disk.

The layout under ``--save DIR`` is ``megatron_ext/checkpoint_layout.py``'s; one checkpoint holds
the model, optimizer, scheduler and run state (torch_dist format) and per-rank RNG states.

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished; the
latest-pointer is replaced after that. A crash at any point therefore leaves the previous
checkpoint and pointer intact. The optimizer state is saved reshardable, so a run can resume
under a different TP / PP / DP layout (the per-rank RNG states are then re-seeded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_ext import checkpoint_manifest as manifest_lib
from megatron_ext.checkpoint_layout import (
    IN_PROGRESS_SUFFIX,
    LATEST,
    checkpoint_dir,
    latest_checkpoint_dir,
    latest_iteration,
    pointer_path,
    resume_candidates,
    saved_iterations,
    set_aside,
    write_pointer,
)
from megatron_ext.checkpoint_manifest import human_bytes
from megatron_ext.training.model_setup import unwrap_model

logger = logging.getLogger("gpas")

# The distributed optimizer's state in a layout-free form: it reloads under another TP/PP/DP
# layout. (megatron-core 0.16.1 removed "fully_sharded_model_space"; "dp_reshardable" fails to
# load with torch's Adam. "fully_reshardable" needs the workaround in _load_optimizer_state.)
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def read_run_state(directory: str) -> dict:
    """The run state saved with the checkpoint in ``directory`` (its common.pt)."""
    common = torch.load(
        os.path.join(directory, "common.pt"), map_location="cpu", weights_only=False
    )
    return common.get("run_state") or {}


def _model_sharded_state_dict(chunks) -> dict:
    """One sharded state dict for all chunks (``model`` or ``model0``, ``model1``… with VPP)."""
    chunks = [unwrap_model(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(chunks, state: dict) -> None:
    unwrapped = [unwrap_model(c) for c in chunks]
    if len(unwrapped) == 1:
        unwrapped[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(unwrapped):
            chunk.load_state_dict(state[f"model{i}"])


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


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_model(chunks, directory: str) -> None:
    """Write the model weights of every rank into ``directory`` (collective)."""
    if _is_rank0():
        os.makedirs(directory, exist_ok=True)
    _barrier()
    dist_checkpointing.save(_model_sharded_state_dict(chunks), directory)


def load_model(chunks, directory: str) -> None:
    """Load weights saved under any TP/PP layout into ``chunks`` (collective)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load: no checkpoint directory at {directory}")
    directory = latest_checkpoint_dir(directory) or directory
    _load_model_state(chunks, dist_checkpointing.load(_model_sharded_state_dict(chunks), directory))


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line naming the directory
    or file, what is wrong, and what to do."""


def _world() -> tuple[int, int]:
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _gather(value) -> list:
    """``value`` of every rank (a one-element list when not distributed)."""
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


@contextlib.contextmanager
def _agreed(fail: Callable[[str], CheckpointError]):
    """Collective: run the block on every rank; if it raised on any rank, raise ``fail(cause)``
    (the first failing rank's cause, in one line) on every rank, so none is left waiting."""
    error = None
    try:
        yield
    except Exception as err:
        error = err
    causes = [c for c in _gather(None if error is None else one_line(error)) if c]
    if causes:
        raise fail(causes[0]) from error


def _failed(what: str) -> Callable[[str], CheckpointError]:
    return lambda cause: CheckpointError(f"{what}: {cause}")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _free_bytes(path: str) -> int:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def check_free_space(root: str, needed: int, what: str) -> None:
    """Collective: refuse with one line giving both numbers when the filesystem of ``root`` has
    less than ``needed`` bytes free (decided on rank 0, so every rank agrees)."""
    rank, _ = _world()
    problem = None
    if rank == 0:
        free = _free_bytes(root)
        if free < needed:
            problem = (
                f"--save {root}: {human_bytes(free)} free, {what} needs about "
                f"{human_bytes(needed)}; free space there (or lower "
                "--keep-last-checkpoints), or point --save at a larger filesystem"
            )
    problem = _gather(problem)[0]
    if problem:
        raise CheckpointError(problem)


def estimate_checkpoint_bytes(chunks, bf16: bool) -> int:
    """Collective: a checkpoint's size before the first one exists: each parameter once, with
    its Adam moments (and fp32 main copy under bf16). The size of the last checkpoint written
    replaces it from then on."""
    local = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    numel = sum(p.numel() for c in chunks for p in c.parameters())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = torch.tensor([local + numel * (12 if bf16 else 8)], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        total /= parallel_state.get_data_parallel_world_size()
    return int(total.item())


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
        with _agreed(self.failure):  # a full disk while writing the manifest, say
            size = _write_manifest(self.tmp, self.iteration, self.hashed).total_bytes
        _barrier()
        if _is_rank0():
            if os.path.isdir(self.final):
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            write_pointer(self.root, self.iteration)
            if self.keep_last:
                _prune(self.root, self.keep_last, self.iteration)
        _barrier()
        return size

    def discard(self) -> None:
        """Remove the partial directory (rank 0); the previous checkpoint and pointer stay."""
        if _is_rank0():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def failure(self, cause: str) -> CheckpointError:
        """The write failed (on some rank): the partial directory goes, the error says what
        is left."""
        self.discard()
        return CheckpointError(f"could not write checkpoint {self.final}: {cause}; {self.intact()}")

    def intact(self) -> str:
        previous = [i for i in saved_iterations(self.root) if i != self.iteration]
        if not previous:
            return "no earlier checkpoint exists under --save"
        return f"the previous checkpoint (iteration {previous[-1]}) and the pointer are intact"


def _write_manifest(directory: str, iteration: int, hashed: bool) -> manifest_lib.Manifest:
    """Collective: every rank describes (and hashes) its share of the files; rank 0 writes."""
    rank, world = _world()
    files = _gather(manifest_lib.list_files(directory) if rank == 0 else None)[0]
    mine = manifest_lib.describe(directory, manifest_lib.shares(files, rank, world), hashed=hashed)
    entries = {}
    for part in _gather(mine):
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
    keep_last: Optional[int] = None,
    hashed: bool = True,
    async_save: bool = False,
) -> PendingSave:
    """Write a checkpoint into ``iter_XXXXXXX.tmp`` (collective). With ``async_save`` the shard
    files are written by megatron-core's async worker: the returned save's ``request`` is to be
    scheduled, and ``finish`` called once it is done on every rank."""
    pending = PendingSave(root, iteration, keep_last, hashed)
    with _agreed(_failed(f"could not create {pending.tmp}")):
        if _is_rank0():
            shutil.rmtree(pending.tmp, ignore_errors=True)
            os.makedirs(pending.tmp)
    with _agreed(pending.failure):
        state = _state_to_save(chunks, optimizer, scheduler, run_state)
        pending.request = dist_checkpointing.save(state, pending.tmp, async_sharded_save=async_save)
        if optimizer is not None:
            os.makedirs(os.path.join(pending.tmp, "rng"), exist_ok=True)
            torch.save(_rng_state(), os.path.join(pending.tmp, "rng", f"{_rank_tag()}.pt"))
    return pending


def _state_to_save(chunks, optimizer, scheduler, run_state: dict) -> dict:
    model_sd = _model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
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


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state (nor step) to load into; megatron-core
    fills it with a zero-gradient step first, the values being replaced by the load."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if (
            hasattr(sub, "_init_optimizer_states_with_dummy_values")
            and inner is not None
            and len(inner.state) == 0
        ):
            sub._init_optimizer_states_with_dummy_values()


def _load_optimizer_state(optimizer, state: dict) -> None:
    """optimizer.load_state_dict, working around a megatron-core 0.16.1 issue: with torch's Adam
    (no Apex/TE) the distributed optimizer's fully-reshardable load copies every per-parameter
    state key, including "step", which that format does not store. The per-parameter "step"
    (restored from the param groups by the first half of the load) is set aside while the
    parameter states are copied in, then put back — one tensor per parameter, since that first
    half hands every parameter the same step tensor, which torch's Adam increments in place
    once per parameter."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    param_state = state.get("param_state") if len(subs) == 1 else None
    distributed = hasattr(subs[0], "load_parameter_state_from_fully_reshardable")
    if not (
        distributed
        and param_state is not None
        and state.get("param_state_sharding_type") == "fully_reshardable"
    ):
        optimizer.load_state_dict(state)
        return
    sub = subs[0]
    rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    sub.load_state_dict(rest)
    steps = {p: st.pop("step") for p, st in sub.optimizer.state.items() if "step" in st}
    try:
        sub.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            sub.optimizer.state[p]["step"] = step.clone()


def _verify(directory: str, verify_hashes: bool) -> Optional[list[str]]:
    """Collective: the problems found in ``directory`` against its manifest (sizes on rank 0,
    hashes shared by all ranks); None when it has no manifest (an older checkpoint)."""
    rank, world = _world()
    m = None
    try:
        m = manifest_lib.read(directory)
        verdict = None if m is None else []
        if m is not None and rank == 0:
            verdict = manifest_lib.size_problems(directory, m)
    except manifest_lib.DamagedCheckpointError as err:
        verdict = [str(err)]
    verdict = _gather(verdict)[0]  # rank 0's, for every rank
    if verdict or verdict is None or not verify_hashes or m is None or not m.hashed:
        return verdict
    share = manifest_lib.shares(sorted(m.files), rank, world)
    mine = manifest_lib.hash_problems(directory, m, share)
    return [p for part in _gather(mine) for p in part]


def choose_checkpoint(root: str, *, on_damaged: str = "fallback", verify_hashes: bool = True):
    """Collective: the checkpoint directory to resume from under ``root`` (None: none there).

    The pointer's checkpoint if it verifies; if it is damaged, ``on_damaged="stop"`` raises one
    line naming the file, ``"fallback"`` sets it aside (``iter_N.damaged``) and tries the next
    older one, saying so. Checkpoints without a manifest (older ones) load unverified."""
    pointer = latest_iteration(root)
    candidates = resume_candidates(root)
    for iteration in candidates:
        directory = checkpoint_dir(root, iteration)
        problems = _verify(directory, verify_hashes)
        if problems is None and pointer is None:
            raise CheckpointError(
                f"--load {root}: holds {os.path.basename(directory)} but no {LATEST} pointer "
                "and no manifest to show the checkpoint is complete; if it is, write its "
                f"iteration into {pointer_path(root)}"
            )
        if not problems:
            if iteration != pointer:
                logger.warning("resuming from %s (the newest intact checkpoint)", directory)
                if _is_rank0():
                    write_pointer(root, iteration)
            return directory
        what = f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if on_damaged == "stop":
            raise CheckpointError(
                f"checkpoint {directory} is damaged: {what}; restore it, or pass "
                "--on-damaged-checkpoint fallback to resume from the newest intact one"
            )
        _barrier()
        if _is_rank0():
            aside = set_aside(directory)
            logger.warning(
                "checkpoint %s is damaged: %s; set aside as %s, falling back to an older one",
                directory, what, os.path.basename(aside),
            )  # fmt: skip
        _barrier()
    if candidates:
        raise CheckpointError(f"--load {root}: no intact checkpoint left to resume from")
    return None


def load_checkpoint(
    root: str,
    chunks,
    optimizer,
    scheduler,
    *,
    load_optimizer: bool = True,
    on_damaged: str = "fallback",
    verify_hashes: bool = True,
) -> Optional[dict]:
    """Restore the newest intact checkpoint under ``root``; returns its run state (None: none
    there)."""
    directory = choose_checkpoint(root, on_damaged=on_damaged, verify_hashes=verify_hashes)
    if directory is None:
        return None
    with _agreed(_failed(f"could not read checkpoint {directory}")):
        state = _read_checkpoint(directory, chunks, optimizer, scheduler, load_optimizer)
    return state


def _read_checkpoint(directory: str, chunks, optimizer, scheduler, load_optimizer: bool) -> dict:
    if read_run_state(directory).get("weights_only") and load_optimizer:
        logger.info("%s holds weights only (no optimizer state); starting from them", directory)
        load_optimizer = False
    model_sd = _model_sharded_state_dict(chunks)
    request = dict(model_sd)
    if load_optimizer:
        _materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_OPTIM_METADATA
        )
    state = dist_checkpointing.load(request, directory)
    _load_model_state(chunks, state)
    if load_optimizer:
        _load_optimizer_state(optimizer, state["optimizer"])
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
