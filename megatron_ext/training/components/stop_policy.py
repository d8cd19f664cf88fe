"""When a run stops before its last iteration: too many skipped steps in a row
(``--nan-skip-limit``: a non-finite loss or gradient norm, or a batch with no loss token), an
exit signal (SLURM preemption), ``--exit-duration-in-mins``, ``--exit-interval``. Decided once
per iteration, after the step; every rank reaches the same verdict (``reason``).

SIGTERM and SIGUSR1 (SLURM preemption) end the run after the step: it is saved, and exits
cleanly."""

from __future__ import annotations

import signal
import time
from typing import Optional

from megatron_ext.config import StopConfig
from megatron_ext.platform.collectives import any_rank
from megatron_ext.training.contract import Component, StepOutcome, StopReason


class ExitSignalHandler:
    """Records that an exit signal arrived; the stop policy asks every rank at iteration ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class StopPolicy(Component):
    """Register it after the components that must still see the last step (the evaluator);
    the loop ends once ``reason`` is set. The run of skipped steps is saved with the
    checkpoint, so a resumed run stops where the uninterrupted one would."""

    state_key = "stop"

    def __init__(self, cfg: StopConfig, signals: Optional[ExitSignalHandler] = None):
        self.cfg = cfg
        self.signals = signals
        self._own_signals = signals is None
        self.start = time.time()
        self.skipped_in_a_row = 0
        self.last_cause = ""
        self.reason: Optional[StopReason] = None

    def on_start(self, state) -> None:
        if self.signals is None:  # the handler is installed for the loop, restored at close
            self.signals = ExitSignalHandler().__enter__()
        self.start = time.time()

    def after_step(self, step: StepOutcome) -> None:
        self.note_step(step.result)
        self.reason = self.check(step.iteration)

    def stop_requested(self) -> Optional[StopReason]:
        return self.reason

    def close(self) -> None:
        if self._own_signals and self.signals is not None:
            self.signals.__exit__(None, None, None)
            self.signals = None

    def note_step(self, result) -> None:
        """Count a step skipped because its loss or gradient norm was not finite, or because
        no token of its batch carried loss (nothing to learn from)."""
        if not (result.non_finite or result.no_loss_tokens):
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        self.last_cause = "no token carried loss" if result.no_loss_tokens else "non-finite loss"

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
        if any_rank(self.signals.received is not None or over_time):
            received = self.signals.received
            return StopReason(f"signal {received}" if received else "time limit reached")
        if c.exit_interval and iteration % c.exit_interval == 0:
            return StopReason(f"--exit-interval {c.exit_interval}")
        return None

    def state_dict(self) -> dict:
        return {"skipped_in_a_row": self.skipped_in_a_row, "last_cause": self.last_cause}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.last_cause = state.get("last_cause", "")
