"""Model checkpoints through megatron-core dist_checkpointing (TP/PP/DP-invariant on disk)."""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing

from megatron_ext.training.model_setup import unwrap_model


def _model_sharded_state_dict(chunks) -> dict:
    """One sharded state dict for all chunks (``model`` or ``model0``, ``model1``… with VPP)."""
    chunks = [unwrap_model(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks, directory: str) -> None:
    """Write the model weights of every rank into ``directory`` (collective)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_model_sharded_state_dict(chunks), directory)


def load_model(chunks, directory: str) -> None:
    """Load weights saved under any TP/PP layout into ``chunks`` (collective)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load: no checkpoint directory at {directory}")
    state = dist_checkpointing.load(_model_sharded_state_dict(chunks), directory)
    unwrapped = [unwrap_model(c) for c in chunks]
    if len(unwrapped) == 1:
        unwrapped[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(unwrapped):
            chunk.load_state_dict(state[f"model{i}"])
