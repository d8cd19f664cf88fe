"""When a restarted run should not start: the ledger of a ``--save`` directory's starts.

A launcher that restarts workers (``torchrun --max-restarts``, the SLURM script's step restarts
and requeues) does not know why they failed. Restarting helps after a dead node or a hang; it
does not after a fault that repeats, or a deterministic stop. So every start is recorded in
``SAVE/restarts.json`` (the launch, whether it is a restart, the iteration it resumed from, how
it stopped), and a restart refuses to run, in one line and with exit code
:data:`exit_codes.NO_PROGRESS` or the earlier stop's own, when

- the last :data:`NO_PROGRESS_LIMIT` restarts all resumed from the checkpoint it would resume
  from (no newer checkpoint was written in between: the fault repeats before any progress), or
- the attempt before it stopped on purpose (bad input, too many non-finite steps, no progress):
  a restart would only do the same again.

A start that is not a restart (the user starting the run again) always runs. Torch-free.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_ext import fileio
from megatron_ext.resilience import exit_codes

LEDGER = "restarts.json"
NO_PROGRESS_LIMIT = 3
_RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", "GPAS_STEP_RESTART")
_KEEP = 100  # starts kept in the ledger


class RestartRefused(RuntimeError):
    """A restart that would not help; ``exit_code`` is the one to exit with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Start:
    launch: str  # the torchrun job, the SLURM job, or this host and parent process
    restart: bool  # started by a launcher's restart (or a requeue), not by a person
    resumed_from: int  # the iteration of the checkpoint it resumed from (0: none)
    time: float
    stopped: Optional[dict] = None  # {"exit": code, "reason": line} of a deterministic stop


def is_restart(environ=os.environ) -> bool:
    return any(int(environ.get(name, "0") or 0) > 0 for name in _RESTART_COUNTS)


def launch_id(environ=os.environ) -> str:
    return (
        environ.get("TORCHELASTIC_RUN_ID")
        or (f"slurm-{environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in environ else None)
        or f"{socket.gethostname()}-{os.getppid()}"
    )


class RestartLedger:
    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LEDGER)

    def starts(self) -> list[Start]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [Start(**s) for s in json.load(f)]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError):
            return []  # unreadable: judged as no history (a restart then runs)

    def check_and_record(self, resumed_from: int, environ=os.environ) -> None:
        """Record this start; raise :class:`RestartRefused` when it is a restart that would not
        help (the ledger then holds the refusal, so the next restart refuses too)."""
        starts = self.starts()
        me = Start(launch_id(environ), is_restart(environ), resumed_from, time.time())
        refusal = _refusal(starts, me) if me.restart else None
        if refusal is not None:
            me.stopped = {"exit": refusal.exit_code, "reason": str(refusal)}
        self._write([*starts, me])
        if refusal is not None:
            raise refusal

    def record_stop(self, exit_code: int, reason: str) -> None:
        """The latest start stopped on purpose (a restart would not change it)."""
        starts = self.starts()
        if starts and starts[-1].stopped is None:
            starts[-1].stopped = {"exit": exit_code, "reason": reason}
            self._write(starts)

    def _write(self, starts: list[Start]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        body = json.dumps([asdict(s) for s in starts[-_KEEP:]], indent=1)
        fileio.write_text(self.path, body)


def _refusal(starts: list[Start], me: Start) -> Optional[RestartRefused]:
    if starts and starts[-1].stopped:
        code, reason = starts[-1].stopped["exit"], starts[-1].stopped["reason"]
        return RestartRefused(
            f"not restarting: the attempt before stopped on purpose (exit {code}: {reason}); "
            "a restart would do the same; fix the cause and start the run again",
            code,
        )
    trailing = 0
    for s in reversed(starts):
        if not (s.restart and s.resumed_from == me.resumed_from):
            break
        trailing += 1
    if trailing >= NO_PROGRESS_LIMIT:
        return RestartRefused(
            f"no progress: the last {trailing} restarts all resumed from iteration "
            f"{me.resumed_from} and failed before writing a newer checkpoint; the fault "
            "repeats (see the log and any stack dumps of those attempts); fix it and start "
            "the run again",
            exit_codes.NO_PROGRESS,
        )
    return None
