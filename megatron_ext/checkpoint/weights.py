"""Model weights in a checkpoint, without the rest of the run: the sharded state dict of the
model chunks, weights-only save and load (export verification, tests, importing from Hugging
Face), and the run state any checkpoint carries in its ``common.pt``."""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing

from megatron_ext.checkpoint.integrity import check_intact
from megatron_ext.checkpoint.layout import latest_checkpoint_dir
from megatron_ext.models.gpt import unwrap_model
from megatron_ext.platform.collectives import barrier, is_rank0

RESTORE_ADVICE = "restore it, or pass an older iter_XXXXXXX directory"


def read_run_state(directory: str) -> dict:
    """The run state saved with the checkpoint in ``directory`` (its common.pt)."""
    common = torch.load(
        os.path.join(directory, "common.pt"), map_location="cpu", weights_only=False
    )
    return common.get("run_state") or {}


def model_sharded_state_dict(chunks) -> dict:
    """One sharded state dict for all chunks (``model`` or ``model0``, ``model1``… with VPP)."""
    chunks = [unwrap_model(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def load_model_state(chunks, state: dict) -> None:
    unwrapped = [unwrap_model(c) for c in chunks]
    if len(unwrapped) == 1:
        unwrapped[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(unwrapped):
            chunk.load_state_dict(state[f"model{i}"])


def save_model(chunks, directory: str) -> None:
    """Write the model weights of every rank into ``directory`` (collective)."""
    if is_rank0():
        os.makedirs(directory, exist_ok=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks, directory: str) -> None:
    """Load weights saved under any TP/PP layout into ``chunks`` (collective); a damaged
    checkpoint is refused as every reader refuses it."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load: no checkpoint directory at {directory}")
    directory = latest_checkpoint_dir(directory) or directory
    check_intact(directory, RESTORE_ADVICE)
    load_model_state(chunks, dist_checkpointing.load(model_sharded_state_dict(chunks), directory))
