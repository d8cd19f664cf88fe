"""Where a run's checkpoints live on disk; torch-free, so the grid and the export tools can read
a save directory without importing torch or megatron-core.

    DIR/iter_0000100/                      one checkpoint (torch_dist format, see
                                           ``checkpoint/save_load.py``)
    DIR/iter_0000100/rng/                  per-rank RNG states
    DIR/iter_0000100/manifest.json         its files, sizes and SHA-256 (written last)
    DIR/iter_0000200.tmp/                  a checkpoint being written (or from a crashed save)
    DIR/iter_0000300.damaged/              one that failed verification, set aside on fall-back
    DIR/latest_checkpointed_iteration.txt  the pointer: the newest complete checkpoint

The pointer moves only after its directory is complete, so it never names a partial one.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from megatron_ext import fileio

LATEST = "latest_checkpointed_iteration.txt"
IN_PROGRESS_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"
# Where a checkpoint keeps the training components' state: the run state's entry of their
# replicated state, the sharded state dict's entry and its tensors' key prefix.
COMPONENTS_KEY = "components"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line naming the directory
    or file, what is wrong, and what to do."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def pointer_path(root: str) -> str:
    return os.path.join(root, LATEST)


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the pointer under ``root`` names (None: no pointer there)."""
    path = pointer_path(root)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"--load: {path} does not hold an iteration number ({text!r})")
    return int(text)


def latest_checkpoint_dir(root: str) -> Optional[str]:
    """The ``iter_XXXXXXX`` directory the pointer under ``root`` names (None: no pointer)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = checkpoint_dir(root, iteration)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"--load: {pointer_path(root)} names iteration {iteration}, but {directory} is missing"
        )
    return directory


def write_pointer(root: str, iteration: int) -> None:
    """Move the pointer (fsync'd: a restart after a power loss must not read an empty file)."""
    fileio.write_text(pointer_path(root), str(iteration), durable=True)


def saved_iterations(root: str) -> list[int]:
    """Iterations of the complete checkpoint directories under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := _ITER_DIR.match(d)))


def resume_candidates(root: str) -> list[int]:
    """Iterations to try resuming from, best first: the pointer's, then older complete ones (for
    a fall-back past a damaged checkpoint). With no pointer, every ``iter_`` directory, newest
    first (only those a manifest shows complete may be used)."""
    latest = latest_iteration(root)
    saved = saved_iterations(root)
    if latest is None:
        return saved[::-1]
    latest_checkpoint_dir(root)  # the pointer must name an existing directory
    return [latest] + [i for i in reversed(saved) if i < latest]


def set_aside(directory: str) -> str:
    """Rename a damaged checkpoint out of the way (kept for inspection, never pruned)."""
    target, n = directory + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
        n += 1
        target = f"{directory}{DAMAGED_SUFFIX}{n}"
    os.replace(directory, target)
    return target


def is_in_progress(path: str) -> bool:
    return path.rstrip("/").endswith(IN_PROGRESS_SUFFIX)
