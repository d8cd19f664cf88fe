"""Checkpoints through megatron-core ``dist_checkpointing``: TP/PP/DP-invariant on disk.

The layout under ``--save DIR`` is ``megatron_ext/checkpoint_layout.py``'s; one checkpoint holds
the model, optimizer, scheduler and run state (torch_dist format) and per-rank RNG states.

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
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_ext.checkpoint_layout import (
    IN_PROGRESS_SUFFIX,
    checkpoint_dir,
    latest_checkpoint_dir,
    saved_iterations,
    write_pointer,
)
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


def save_checkpoint(
    root: str,
    iteration: int,
    chunks,
    optimizer,
    scheduler,
    run_state: dict,
    keep_last: Optional[int] = None,
) -> str:
    """Atomically save everything needed to resume exactly (collective).

    With ``optimizer=None`` only the weights are written (``run_state["weights_only"]`` is set):
    such a checkpoint starts a run (e.g. one imported from Hugging Face) rather than resuming it.
    """
    final = checkpoint_dir(root, iteration)
    tmp = final + IN_PROGRESS_SUFFIX
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd = _model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    else:
        run_state = dict(run_state, weights_only=True)
    state["run_state"] = run_state
    dist_checkpointing.save(state, tmp)
    if optimizer is not None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"{_rank_tag()}.pt"))
    _barrier()
    if _is_rank0():
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_pointer(root, iteration)
        if keep_last:
            _prune(root, keep_last, iteration)
    _barrier()
    return final


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


def load_checkpoint(
    root: str, chunks, optimizer, scheduler, *, load_optimizer: bool = True
) -> Optional[dict]:
    """Restore the latest checkpoint under ``root``; returns its run state (None: none there)."""
    directory = latest_checkpoint_dir(root)
    if directory is None:
        return None
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
