"""The one integrity check every checkpoint reader applies (``--load``, ``--finetune``,
``--pretrained-checkpoint``, the Hugging Face export and through it the downstream tool):
the checkpoint's files against its manifest, sizes always and SHA-256 where recorded.

Collective under a process group (rank 0 checks sizes, every rank hashes a share of the
files); the same call checks everything in one process without one.
"""

from __future__ import annotations

from typing import Optional

from megatron_ext.checkpoint import manifest as manifest_lib
from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.platform.collectives import decided_by_rank0, gather, world


def find_damage(directory: str, verify_hashes: bool = True) -> Optional[list[str]]:
    """The problems found in ``directory`` (empty: intact); None when it has no manifest (a
    checkpoint written before manifests existed, loaded unverified)."""
    rank, size = world()
    m, unreadable = None, None
    try:
        m = manifest_lib.read(directory)
    except manifest_lib.DamagedCheckpointError as err:
        unreadable = str(err)

    def sizes_checked() -> Optional[list[str]]:
        if unreadable is not None:
            return [unreadable]
        return None if m is None else manifest_lib.size_problems(directory, m)

    verdict = decided_by_rank0(sizes_checked)
    if verdict or verdict is None or not verify_hashes or m is None or not m.hashed:
        return verdict
    share = manifest_lib.shares(sorted(m.files), rank, size)
    mine = manifest_lib.hash_problems(directory, m, share)
    return [p for part in gather(mine) for p in part]


def summary(directory: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"checkpoint {directory} is damaged: {problems[0]}{more}"


def damage_error(directory: str, problems: list[str], advice: str) -> CheckpointError:
    """The one line that refuses a damaged checkpoint, whoever reads it."""
    return CheckpointError(f"{summary(directory, problems)}; {advice}")


def check_intact(directory: str, advice: str, verify_hashes: bool = True) -> None:
    """Raise :func:`damage_error` unless ``directory`` matches its manifest (or has none)."""
    problems = find_damage(directory, verify_hashes)
    if problems:
        raise damage_error(directory, problems, advice)
