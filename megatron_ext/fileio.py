"""Files written whole or not at all: a reader (or a run killed mid-write) never sees half a file.

Everything goes to a temporary name beside the target (same directory, hence same filesystem)
and is renamed over it when complete; a failed write removes the temporary file and leaves the
previous version in place. Torch-free, so light tools can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator


def temporary_name(path: str) -> str:
    """``name.tmp.ext`` beside ``path`` (the extension kept: matplotlib picks the format by it)."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{ext}"


@contextlib.contextmanager
def atomic_path(path: str, *, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` (``durable``: fsync'd
    first, for files a restart depends on)."""
    tmp = temporary_name(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, *, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, value, *, indent: int = 1, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")
