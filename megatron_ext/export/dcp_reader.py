"""Read a megatron-core ``torch_dist`` checkpoint on one CPU process, one tensor slice at a time.

Keys on disk are TP/PP/DP-invariant global tensors (megatron-core merged the layout on save), so
reading needs no model and no process group. Layer parameters are stored either stacked
(``decoder.layers.<name>`` of shape [L, …]) or per layer (``decoder.layers.<i>.<name>``, Mix-LN's
heterogeneous layout); :meth:`DistCheckpointReader.layer_tensor` hides the difference and reads
only the chunks of the one layer asked for, so memory stays at one layer.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.checkpoint.integrity import check_intact
from megatron_ext.checkpoint.layout import CheckpointError, is_in_progress, latest_checkpoint_dir
from megatron_ext.checkpoint.weights import RESTORE_ADVICE, read_run_state
from megatron_ext.config import ModelConfig

LAYER_PREFIX = "decoder.layers."

__all__ = ["CheckpointError", "DistCheckpointReader", "resolve_checkpoint_dir"]


def resolve_checkpoint_dir(path: str) -> str:
    """``path`` may be a save root (with a latest-pointer) or one ``iter_XXXXXXX`` directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    try:
        path = latest_checkpoint_dir(path) or path
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from err
    if is_in_progress(path):
        raise CheckpointError(
            f"{path} is a checkpoint still being written (or from a crashed save); "
            "pass the save root or a finished iter_XXXXXXX directory"
        )
    for name in (".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(
                f"{path} is not a complete torch_dist checkpoint: {name} is missing "
                "(pass the --save directory or one of its iter_XXXXXXX directories)"
            )
    check_intact(path, RESTORE_ADVICE)  # as every reader of a checkpoint checks it
    return path


class _SliceLoadPlanner(LoadPlanner):
    """Routes every read item into one preallocated destination tensor."""

    def __init__(self, destination: torch.Tensor):
        self.destination = destination

    def set_up_planner(self, *args, **kwargs):  # pragma: no cover - not used by read_data
        pass

    def create_local_plan(self):  # pragma: no cover
        raise NotImplementedError

    def create_global_plan(self, plans):  # pragma: no cover
        raise NotImplementedError

    def finish_plan(self, plan):  # pragma: no cover
        return plan

    def load_bytes(self, read_item, value):  # pragma: no cover - tensors only
        raise NotImplementedError

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.destination
        for dim, (offset, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            out = out.narrow(dim, offset, length)
        return out

    def commit_tensor(self, read_item, tensor):
        pass


class DistCheckpointReader:
    """Tensor-by-tensor access to one ``torch_dist`` checkpoint directory."""

    def __init__(self, path: str):
        self.directory = resolve_checkpoint_dir(path)
        self._reader = FileSystemReader(self.directory)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:
            raise CheckpointError(f"{self.directory}/.metadata cannot be read ({err})") from err
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self._check_files()
        self.run_state = read_run_state(self.directory)
        if "config" not in self.run_state:
            raise CheckpointError(
                f"{self.directory}/common.pt has no run configuration; it was not written by "
                "pretrain_gpas.py or tools/convert_from_hf.py"
            )
        self.tensors = {
            k: v
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer")
        }

    def _check_files(self) -> None:
        needed = {info.relative_path for info in self.metadata.storage_data.values()}
        missing = sorted(f for f in needed if not os.path.isfile(os.path.join(self.directory, f)))
        if missing:
            raise CheckpointError(
                f"{self.directory} is partial: {', '.join(missing)} "
                f"({len(missing)} of {len(needed)} data files) missing"
            )

    # -- configuration ---------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.run_state["config"]["model"])

    def tokenizer_config(self) -> dict:
        return dict(self.run_state["config"].get("tokenizer") or {})

    def params_dtype(self) -> torch.dtype:
        return self.tensors["embedding.word_embeddings.weight"].properties.dtype

    # -- tensors ----------------------------------------------------------------------------
    def read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key``, or its slice ``[index]`` along dim 0."""
        meta = self.tensors.get(key)
        if meta is None:
            raise CheckpointError(f"{self.directory} has no tensor {key!r}")
        size = list(meta.size)
        offsets = [0] * len(size)
        if index is not None:
            offsets[0], size[0] = index, 1
        out = torch.empty(size, dtype=meta.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
        items = create_read_items_for_chunk_list(key, meta, [chunk])
        self._reader.read_data(LoadPlan(items), _SliceLoadPlanner(out)).wait()
        return out[0] if index is not None else out

    def layer_tensor(self, layer: int, name: str) -> torch.Tensor:
        """Parameter ``name`` (e.g. ``mlp.linear_fc2.weight``) of 0-based global layer ``layer``."""
        per_layer = f"{LAYER_PREFIX}{layer}.{name}"
        if per_layer in self.tensors:
            return self.read(per_layer)
        return self.read(LAYER_PREFIX + name, index=layer)
