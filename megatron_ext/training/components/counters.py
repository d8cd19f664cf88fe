"""The run's counters of steps whose update did not happen: every skipped update (a
non-finite loss or gradient norm, a batch with no loss token, a spike refused under
``--skip-spiky-steps``), and of those the batches with no loss token. Counted in one place,
saved with the checkpoint, reported in the step record."""

from __future__ import annotations

import logging

from megatron_ext.training.contract import Component, StepOutcome

logger = logging.getLogger("gpas")


class RunCounters(Component):
    state_key = "counters"

    def __init__(self) -> None:
        self.skipped_total = 0
        self.no_loss_total = 0

    def after_step(self, step: StepOutcome) -> None:
        result = step.result
        if not result.applied:
            self.skipped_total += 1
        if result.no_loss_tokens:
            self.no_loss_total += 1
            logger.warning(
                "iteration %d skipped: no token of the batch carries loss (%d such in the run); "
                "check the data against --seq-length",
                step.iteration,
                self.no_loss_total,
            )
        elif result.non_finite:
            logger.warning("iteration %d skipped: non-finite loss or gradient norm", step.iteration)
        step.record_metric("skipped_iterations", self.skipped_total)
        if self.no_loss_total:
            step.record_metric("no_loss_iterations", self.no_loss_total)

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "no_loss_total": self.no_loss_total}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.no_loss_total = int(state.get("no_loss_total", 0))
