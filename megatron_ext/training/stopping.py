"""When a run stops before its last iteration: too many skipped steps in a row
(``--nan-skip-limit``: a non-finite loss or gradient norm, or a batch with no loss token), an
exit signal (SLURM preemption), ``--exit-duration-in-mins``, ``--exit-interval``. Asked once
per iteration, after the step; every rank gets the same answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from megatron_ext.config import StopConfig
from megatron_ext.training.signals import ExitSignalHandler

logger = logging.getLogger("gpas")


@dataclass(frozen=True)
class StopReason:
    message: str
    non_finite: bool = False  # the run failed: a TrainingStopped error, not a clean exit


class StopPolicy:
    def __init__(self, cfg: StopConfig, signals: ExitSignalHandler):
        self.cfg = cfg
        self.signals = signals
        self.start = time.time()
        self.skipped_in_a_row = 0
        self.last_cause = ""

    def note_step(self, result, state) -> None:
        """Count a step whose update was skipped because its loss or gradient norm was not
        finite, or because no token of its batch carried loss (nothing to learn from)."""
        if not (result.non_finite or result.no_loss_tokens):
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        state.skipped_total += 1
        self.last_cause = "no token carried loss" if result.no_loss_tokens else "non-finite loss"
        if result.no_loss_tokens:
            state.no_loss_total += 1
            logger.warning(
                "iteration %d skipped: no token of the batch carries loss (%d such in the run, "
                "%d skipped in a row); check the data against --seq-length",
                state.iteration,
                state.no_loss_total,
                self.skipped_in_a_row,
            )
            return
        logger.warning(
            "iteration %d skipped: non-finite loss or gradient norm (%d in a row)",
            state.iteration,
            self.skipped_in_a_row,
        )

    def check(self, iteration: int) -> Optional[StopReason]:
        """Collective (the signal and the time limit are agreed over all ranks)."""
        if self.skipped_in_a_row >= self.cfg.nan_skip_limit:
            return StopReason(
                f"{self.skipped_in_a_row} iterations in a row were skipped, the last for: "
                f"{self.last_cause} (--nan-skip-limit)",
                non_finite=True,
            )
        c = self.cfg
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
