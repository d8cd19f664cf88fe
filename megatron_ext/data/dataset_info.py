"""What a preprocessed dataset knows about itself: ``<prefix>.meta.json`` next to .bin/.idx.

Written by preprocessing (atomically, after the .bin/.idx), read by training before anything
is built. It records the tokenizer (type, a fingerprint of its file, vocabulary, EOD id) and the
largest token id, so that training can refuse data made with another tokenizer — the one
mistake no size check catches when two vocabularies are the same size (T5's and Llama's are
both 32k) — and data whose ids do not fit the model, without reading the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from megatron_ext import fileio

SIDECAR_SUFFIX = ".meta.json"
FORMAT_VERSION = 1


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


def tokenizer_file(path: str) -> str:
    """The file that defines a tokenizer: the model itself, or a directory's tokenizer.json."""
    if os.path.isdir(path):
        return os.path.join(path, "tokenizer.json")
    return path


def tokenizer_fingerprint(path: str) -> str:
    """sha256 of the tokenizer's defining file, ``sha256:<hex>``."""
    digest = hashlib.sha256()
    with open(tokenizer_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass
class DatasetInfo:
    tokenizer_type: str
    tokenizer_fingerprint: str
    vocab_size: int
    eod_id: Optional[int]
    max_token_id: int  # -1 for a dataset without tokens
    documents: int
    tokens: int
    tool_version: str
    format_version: int = FORMAT_VERSION
    sft: Optional[dict] = None  # SFT data: how it was cut ({"seq_length": …, "packed": …})

    def write(self, prefix: str) -> None:
        """Write ``<prefix>.meta.json`` via a temporary name, so a reader never sees half."""
        fileio.write_json(sidecar_path(prefix), dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def read(cls, prefix: str) -> Optional[DatasetInfo]:
        """The sidecar of ``prefix``, or None for a dataset made before sidecars existed."""
        path = sidecar_path(prefix)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in names})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a dataset description ({err})") from err


def merged_info(parts: Sequence[DatasetInfo]) -> DatasetInfo:
    """The description of datasets concatenated in order (they must share one tokenizer)."""
    first = parts[0]
    for other in parts[1:]:
        if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise ValueError("cannot merge datasets made with different tokenizers")
    return dataclasses.replace(
        first,
        max_token_id=max(p.max_token_id for p in parts),
        documents=sum(p.documents for p in parts),
        tokens=sum(p.tokens for p in parts),
    )
