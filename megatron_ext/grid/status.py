"""A cell's state, read from its files only (so the local runner, a Slurm array and the table
agree): finished when its checkpoint reached the last iteration; failed when its last attempt
exited with an error; interrupted when a checkpoint or an attempt exists; else pending."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from megatron_ext import fileio
from megatron_ext.checkpoint.layout import latest_iteration
from megatron_ext.grid.spec import Cell
from megatron_ext.metrics_file import MetricsFile

STATUS_FILE = "status.json"
PENDING, RUNNING, FINISHED, INTERRUPTED, FAILED = (
    "pending",
    "running",
    "finished",
    "interrupted",
    "failed",
)


@dataclass
class CellState:
    state: str
    iteration: int  # of the latest checkpoint (0: none)
    attempts: int
    exit_code: Optional[int]
    seconds: float  # wall time over all attempts

    def summary(self) -> str:
        extra = f", exit {self.exit_code}" if self.state == FAILED else ""
        return f"{self.state} (iter {self.iteration}, {self.attempts} attempts{extra})"


def latest_checkpoint_iteration(cell: Cell) -> int:
    """The cell's checkpoint pointer, read as training reads it (0: none, or unreadable)."""
    try:
        return latest_iteration(cell.checkpoints) or 0
    except (OSError, ValueError):
        return 0


def read_status(cell: Cell) -> dict:
    try:
        with open(os.path.join(cell.directory, STATUS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_status(cell: Cell, **values) -> None:
    status = {**read_status(cell), **values, "updated": round(time.time(), 3)}
    fileio.write_json(os.path.join(cell.directory, STATUS_FILE), status)


def cell_state(cell: Cell, train_iters: int) -> CellState:
    status = read_status(cell)
    iteration = latest_checkpoint_iteration(cell)
    attempts = status.get("attempts", 0)
    code = status.get("exit_code")
    if iteration >= train_iters:
        state = FINISHED
    elif status.get("state") == FAILED:
        state = FAILED
    elif iteration or attempts:
        state = INTERRUPTED
    else:
        state = PENDING
    return CellState(state, iteration, attempts, code, status.get("seconds", 0.0))


def final_validation(cell: Cell, train_iters: int) -> Optional[dict]:
    """The validation record at the last iteration (None: the cell has none)."""
    try:
        return MetricsFile.read(cell.metrics_path).validation_at(train_iters)
    except OSError:
        return None
