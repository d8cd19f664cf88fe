"""``--save``'s restart ledger (``resilience/restart_ledger.py``) for the run: each start is
recorded once the checkpoint is loaded (the iteration it resumes from is known, nothing has been
written yet), a restart that would not help is refused on every rank, and a run that stops on
purpose leaves that in the ledger, so that a launcher's restart of it is refused."""

from __future__ import annotations

from typing import Optional

from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.platform.collectives import decided_by_rank0, is_rank0, one_line
from megatron_ext.resilience import exit_codes
from megatron_ext.resilience.restart_ledger import RestartLedger, RestartRefused
from megatron_ext.training.contract import Component, TrainingStopped

# The errors that stop a run on purpose, and the exit code the CLI gives each.
DELIBERATE_STOPS = ((TrainingStopped, exit_codes.STOPPED), (CheckpointError, exit_codes.STOPPED))


class RestartGuard(Component):
    def __init__(self, save: str):
        self.ledger = RestartLedger(save)
        self.recorded = False  # this start is in the ledger

    def after_load(self, iteration: int) -> None:
        self._record_start(iteration)

    def on_error(self, error: BaseException) -> None:
        code = next((c for kind, c in DELIBERATE_STOPS if isinstance(error, kind)), None)
        if code is not None and self.recorded and is_rank0():
            self.ledger.record_stop(code, one_line(error))

    def _record_start(self, resumed_from: int) -> None:
        """Collective: rank 0 records the start and judges it; every rank refuses alike."""

        def judged() -> Optional[tuple[str, int]]:
            try:
                self.ledger.check_and_record(resumed_from)
            except RestartRefused as err:
                return str(err), err.exit_code
            return None

        refusal = decided_by_rank0(judged)
        self.recorded = True
        if refusal is not None:
            raise RestartRefused(*refusal)
