"""What a run resumes from: the pointer's checkpoint if it is intact, else (by
``--on-damaged-checkpoint``) a refusal or the newest intact older one, the damaged one set
aside."""

from __future__ import annotations

import logging
import os

from megatron_ext.checkpoint.integrity import damage_error, find_damage, summary
from megatron_ext.checkpoint.layout import (
    LATEST,
    CheckpointError,
    checkpoint_dir,
    latest_iteration,
    pointer_path,
    resume_candidates,
    set_aside,
    write_pointer,
)
from megatron_ext.platform.collectives import barrier, is_rank0

logger = logging.getLogger("gpas")

STOP_ADVICE = (
    "restore it, or pass --on-damaged-checkpoint fallback to resume from the newest intact one"
)


def choose_checkpoint(root: str, *, on_damaged: str = "fallback", verify_hashes: bool = True):
    """Collective: the checkpoint directory to resume from under ``root`` (None: none there).

    The pointer's checkpoint if it verifies; if it is damaged, ``on_damaged="stop"`` raises one
    line naming the file, ``"fallback"`` sets it aside (``iter_N.damaged``) and tries the next
    older one, saying so. Checkpoints without a manifest (older ones) load unverified."""
    pointer = latest_iteration(root)
    candidates = resume_candidates(root)
    for iteration in candidates:
        directory = checkpoint_dir(root, iteration)
        problems = find_damage(directory, verify_hashes)
        if problems is None and pointer is None:
            raise CheckpointError(
                f"--load {root}: holds {os.path.basename(directory)} but no {LATEST} pointer "
                "and no manifest to show the checkpoint is complete; if it is, write its "
                f"iteration into {pointer_path(root)}"
            )
        if not problems:
            if iteration != pointer:
                logger.warning("resuming from %s (the newest intact checkpoint)", directory)
                if is_rank0():
                    write_pointer(root, iteration)
            return directory
        if on_damaged == "stop":
            raise damage_error(directory, problems, STOP_ADVICE)
        barrier()
        if is_rank0():
            aside = set_aside(directory)
            logger.warning(
                "%s; set aside as %s, falling back to an older one",
                summary(directory, problems), os.path.basename(aside),
            )  # fmt: skip
        barrier()
    if candidates:
        raise CheckpointError(f"--load {root}: no intact checkpoint left to resume from")
    return None
