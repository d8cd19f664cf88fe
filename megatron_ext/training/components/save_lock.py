"""One run per ``--save`` directory: the lock is taken as the setup starts (before anything is
written there), its heartbeat is kept alive by every step and phase (it stops in a hung run, so
that a later run may take the lock over), and it is released when the run closes."""

from __future__ import annotations

import logging
from typing import Optional

from megatron_ext.platform.collectives import decided_by_rank0
from megatron_ext.resilience.run_lock import STALLED_AFTER_S, RunLock, RunLockError
from megatron_ext.training.contract import SETUP, Component, StepOutcome

logger = logging.getLogger("gpas")


class SaveDirLock(Component):
    """Register it before the setup starts. ``quiet_s``: how long the run may go without
    progress before the heartbeat stops (at least as long as a start may take)."""

    def __init__(self, save: str, quiet_s: float = STALLED_AFTER_S):
        self.save = save
        self.quiet_s = max(STALLED_AFTER_S, quiet_s)
        self.lock: Optional[RunLock] = None  # rank 0's
        self._taken = False

    def phase_started(self, phase: str, iteration: int) -> None:
        if phase == SETUP and not self._taken:
            self._taken = True
            self._take()
        self._progressed()

    def phase_ended(self, phase: str, iteration: int) -> None:
        self._progressed()

    def before_step(self, iteration: int) -> None:
        self._progressed()

    def after_step(self, step: StepOutcome) -> None:
        self._progressed()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()  # once released, releasing again does nothing

    def _take(self) -> None:
        """Collective: rank 0 takes the lock; every rank raises the same :class:`RunLockError`
        when another run holds it."""

        def take() -> tuple[str, Optional[str]]:
            lock = RunLock(self.save)
            try:
                taken_over = lock.acquire()
                lock.start_heartbeat(stalled_after_s=self.quiet_s)
            except (RunLockError, OSError) as err:
                return "refused", str(err)
            self.lock = lock
            return "taken", taken_over

        outcome, message = decided_by_rank0(take)
        if outcome == "refused":
            raise RunLockError(message)
        if message:
            logger.warning(message)

    def _progressed(self) -> None:
        if self.lock is not None:
            self.lock.note_progress()
