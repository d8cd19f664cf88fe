"""Write a model as size-bounded safetensors shards while it is being produced.

Tensors are buffered until a shard is full, written, and dropped, so converting holds at most one
shard plus the tensors in flight. Shards get their final ``model-0000k-of-0000N`` names (and the
index file) in :meth:`ShardedSafetensorsWriter.finish`, once N is known.
"""

from __future__ import annotations

import json
import os
import re

import torch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """ "5GB", "500MB", "2GiB" or a byte count → bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


class ShardedSafetensorsWriter:
    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _part_path(self, k: int) -> str:
        return os.path.join(self.directory, f"part-{k:05d}.safetensors")

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file  # the hf extra; --help works without it

        save_file(self._pending, self._part_path(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, name all shards and write the index; returns the file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            os.replace(self._part_path(k), os.path.join(self.directory, name))
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t: names[k] for k, shard in enumerate(self._shards) for t in shard},
            }
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names
