"""When a run stops before its last iteration: too many non-finite steps in a row
(``--nan-skip-limit``), an exit signal (SLURM preemption), ``--exit-duration-in-mins``,
``--exit-interval``. Asked once per iteration, after the step; every rank gets the same
answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from megatron_ext.training.signals import ExitSignalHandler

logger = logging.getLogger("gpas")


@dataclass(frozen=True)
class StopReason:
    message: str
    non_finite: bool = False  # the run failed: a TrainingStopped error, not a clean exit


class StopPolicy:
    def __init__(self, cfg, signals: ExitSignalHandler):
        self.checkpoint = cfg.checkpoint
        self.nan_skip_limit = cfg.optim.nan_skip_limit
        self.signals = signals
        self.start = time.time()
        self.skipped_in_a_row = 0

    def note_step(self, finite: bool, state) -> None:
        """Count a step whose loss or gradient norm was not finite (its update was skipped)."""
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        state.skipped_total += 1
        logger.warning(
            "iteration %d skipped: non-finite loss or gradient norm (%d in a row)",
            state.iteration,
            self.skipped_in_a_row,
        )

    def check(self, iteration: int) -> Optional[StopReason]:
        """Collective (the signal and the time limit are agreed over all ranks)."""
        if self.skipped_in_a_row >= self.nan_skip_limit:
            return StopReason(
                f"{self.skipped_in_a_row} iterations in a row had a non-finite loss or gradient "
                "norm (--nan-skip-limit)",
                non_finite=True,
            )
        c = self.checkpoint
        over_time = (
            c.exit_duration_in_mins is not None
            and (time.time() - self.start) / 60.0 >= c.exit_duration_in_mins
        )
        if self.signals.agreed(extra=over_time):
            received = self.signals.received
            return StopReason(f"signal {received}" if received else "time limit reached")
        if c.exit_interval and iteration % c.exit_interval == 0:
            return StopReason(f"--exit-interval {c.exit_interval}")
        return None
