"""A checkpoint's manifest: every file it holds, with its size and (optionally) its SHA-256.

Written last into the checkpoint's in-progress directory, after every rank has finished writing
and before the directory is renamed and the pointer moves, so a checkpoint with a manifest is a
complete one, and loading can tell a damaged file (truncated, missing, altered) from a good one
before megatron-core reads it. Sizes are always recorded and checked (a ``stat`` per file);
hashing reads every byte, so each rank hashes a share of the files (``shares``).

Torch-free: the checks run anywhere (``verify_sizes`` on a login node, say).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from megatron_ext import fileio
from megatron_ext.checkpoint.layout import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: Optional[str] = None


@dataclass(frozen=True)
class Manifest:
    files: dict  # relative path -> FileEntry
    hashed: bool

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def human_bytes(n: float) -> str:
    """``3.4 MiB``, ``1.20 GiB``: sizes in messages, readable at any scale."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files do not match its manifest; the message names the file."""


def list_files(directory: str) -> list[str]:
    """Every file under ``directory`` (relative, sorted), the manifest itself excepted."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def shares(files: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` hashes: every ``world_size``-th, so each rank reads about as much."""
    return list(files[rank::world_size])


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(directory: str, files: Iterable[str], *, hashed: bool) -> dict:
    """{relative path: FileEntry} of ``files`` as they are on disk now."""
    out = {}
    for rel in files:
        path = os.path.join(directory, rel)
        out[rel] = FileEntry(os.path.getsize(path), sha256_of(path) if hashed else None)
    return out


def write(directory: str, entries: dict, *, hashed: bool, iteration: int) -> Manifest:
    """The manifest of ``directory`` (durable: the checkpoint counts as complete once it exists)."""
    body = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "hashed": hashed,
        "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(entries.items())},
    }
    fileio.write_text(os.path.join(directory, MANIFEST), json.dumps(body, indent=1), durable=True)
    return Manifest(dict(entries), hashed)


def read(directory: str) -> Optional[Manifest]:
    """The manifest of a checkpoint directory; None for a checkpoint written without one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
        files = {k: FileEntry(int(v["size"]), v.get("sha256")) for k, v in body["files"].items()}
        return Manifest(files, bool(body.get("hashed")))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedCheckpointError(f"{path}: unreadable manifest ({err})") from err


def size_problems(directory: str, manifest: Manifest) -> list[str]:
    """Missing files and files whose size differs from the manifest's (cheap: one stat each)."""
    problems = []
    for rel, entry in manifest.files.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != entry.size:
            problems.append(f"{path}: {size:,} bytes, the manifest says {entry.size:,}")
    return problems


def hash_problems(directory: str, manifest: Manifest, files: Iterable[str]) -> list[str]:
    """Files among ``files`` whose SHA-256 differs from the manifest's."""
    problems = []
    for rel in files:
        expected = manifest.files[rel].sha256
        if expected is None:
            continue
        path = os.path.join(directory, rel)
        if os.path.isfile(path) and sha256_of(path) != expected:
            problems.append(f"{path}: contents differ from the manifest (SHA-256)")
    return problems
