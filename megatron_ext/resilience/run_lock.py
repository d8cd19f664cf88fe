"""One run per ``--save`` directory: a lock file naming its holder (host, pid, SLURM job).

A second run on the same directory refuses with one line naming the holder. A lock whose holder
is gone is taken over, saying so: the holder's pid is dead on this host, or the holder is an
earlier incarnation of this SLURM job (a requeue) or an earlier attempt of this torchrun job (a
restart by ``--max-restarts``), or its heartbeat (the file's modification
time, refreshed every ``HEARTBEAT_S`` by a background thread) is older than ``STALE_AFTER_S``
(a job on another node that crashed, or hung: the heartbeat beats only while the run notes
progress at least every ``STALLED_AFTER_S``, since a thread keeps running in a process whose
main thread waits in a collective forever).

What it relies on, so that it works on the shared filesystems clusters use (NFSv3+, Lustre,
GPFS) where ``flock`` may be unsupported or node-local: an exclusive create (``O_CREAT|O_EXCL``)
and a rename are atomic, and modification times written by one node are seen by the others
(clock skew between nodes must stay well under ``STALE_AFTER_S``). Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
# No step or phase begun or ended for this long: the run is hung, its heartbeat stops. Longer
# than any healthy stretch without one (a setup that builds dataset indices, a save, a
# validation pass of a large model).
STALLED_AFTER_S = 1800.0


class RunLockError(RuntimeError):
    """Another run holds the directory; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job_id: Optional[str]
    started: float
    torchrun_id: Optional[str] = None  # TORCHELASTIC_RUN_ID: one torchrun job, all attempts
    attempt: int = 0  # TORCHELASTIC_RESTART_COUNT: workers torchrun restarted count up

    @classmethod
    def this_process(cls) -> Holder:
        job = os.environ.get("SLURM_JOB_ID")
        torchrun_id = os.environ.get("TORCHELASTIC_RUN_ID")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        return cls(socket.gethostname(), os.getpid(), job, time.time(), torchrun_id, attempt)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}{job}, since {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, directory: str, *, stale_after_s: float = STALE_AFTER_S):
        self.path = os.path.join(directory, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.me = Holder.this_process()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._progress = time.monotonic()

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a line to log when a gone holder's lock was taken over.
        Raises :class:`RunLockError` while a live run holds it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(5):  # a lost race to take over a stale lock: look again
            if self._create():
                return None
            holder, age = self._read()
            reason = self._gone(holder, age)
            if reason is None:
                raise RunLockError(self._held_message(holder, age))
            if self._take_over(holder) and self._create():
                return f"{self.path}: took over the lock of {self._who(holder)} ({reason})"
        raise RunLockError(f"{self.path}: could not take the lock (other runs keep racing for it)")

    def note_progress(self) -> None:
        """The run moved: a step or a phase began or ended."""
        self._progress = time.monotonic()

    def start_heartbeat(
        self, every_s: float = HEARTBEAT_S, stalled_after_s: float = STALLED_AFTER_S
    ) -> None:
        """Refresh the lock's modification time every ``every_s`` while the run has noted
        progress within ``stalled_after_s`` (a run hung in a collective lets its lock go
        stale)."""
        self.note_progress()

        def beat():
            while not self._stop.wait(every_s):
                if time.monotonic() - self._progress < stalled_after_s:
                    with contextlib.suppress(OSError):
                        os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = self._read()
        if holder is not None and (holder.host, holder.pid) == (self.me.host, self.me.pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    # -- internals --------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self, path: Optional[str] = None) -> tuple[Optional[Holder], float]:
        """The holder (None: no lock, or an unreadable one) and seconds since its heartbeat."""
        path = path or self.path
        try:
            age = time.time() - os.path.getmtime(path)
            with open(path, encoding="utf-8") as f:
                return Holder(**json.load(f)), age
        except FileNotFoundError:
            return None, 0.0
        except (ValueError, TypeError):
            return None, age  # half-written by a run killed while creating it

    def _gone(self, holder: Optional[Holder], age: float) -> Optional[str]:
        """Why the holder no longer runs (None: it may still)."""
        if holder is None:
            return "the lock file is unreadable" if age > 5.0 else None
        if holder.host == self.me.host and holder.pid == self.me.pid:
            return "this process"
        if holder.host == self.me.host and not _pid_alive(holder.pid):
            return f"pid {holder.pid} is not running"
        if holder.slurm_job_id and holder.slurm_job_id == self.me.slurm_job_id:
            return f"an earlier run of this SLURM job {holder.slurm_job_id}, requeued"
        if (
            holder.torchrun_id
            and holder.torchrun_id == self.me.torchrun_id
            and holder.attempt < self.me.attempt
        ):
            return f"attempt {holder.attempt} of this torchrun job, restarted"
        if age > self.stale_after_s:
            return f"no heartbeat for {age / 60:.0f} min"
        return None

    def _take_over(self, stale: Optional[Holder]) -> bool:
        """Move the stale lock aside (a rename: one contender wins); False if another run got
        there first (the file moved aside is then not the stale one, and goes back)."""
        aside = f"{self.path}.stale.{self.me.host}.{self.me.pid}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        taken, _ = self._read(aside)
        if stale is not None and taken != stale:
            os.replace(aside, self.path)
            return False
        with contextlib.suppress(OSError):
            os.remove(aside)
        return True

    def _who(self, holder: Optional[Holder]) -> str:
        return "an unknown run" if holder is None else f"the run on {holder.describe()}"

    def _held_message(self, holder: Optional[Holder], age: float) -> str:
        who = holder.describe() if holder else "a run starting now"
        return (
            f"--save {os.path.dirname(self.path)} is in use by another run ({who}; heartbeat "
            f"{age:.0f} s ago): stop that run or choose another --save (a crashed run's lock is "
            f"taken over after {self.stale_after_s / 60:.0f} min without a heartbeat, at once "
            "from the same host or SLURM job)"
        )
