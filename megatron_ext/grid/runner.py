"""Run a grid's cells on this machine, N at a time, each as its own pretrain_gpas.py process.

Finished cells are skipped; interrupted ones resume from their checkpoints (``--load``); a
failed cell is recorded and the grid goes on. SIGINT/SIGTERM to the runner is passed to the
running cells, which finish their iteration, save and exit (they resume on the next run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.grid.spec import Cell, GridSpec, write_recipe
from megatron_ext.grid.status import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    cell_state,
    read_status,
    write_status,
)
from megatron_ext.metrics_file import last_iteration

#: what each cell runs after the interpreter (the installed ``gpas-pretrain``, from any directory)
ENTRY_POINT = ("-m", "megatron_ext.cli.pretrain")


@dataclass
class _Running:
    cell: Cell
    process: subprocess.Popen
    started: float
    log: object


@dataclass
class GridReport:
    finished: list = field(default_factory=list)  # this run
    failed: list = field(default_factory=list)
    interrupted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # already finished before this run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


class LocalGridRunner:
    def __init__(
        self,
        spec: GridSpec,
        *,
        parallel: int = 1,
        threads_per_cell: Optional[int] = None,
        retry_failed: bool = True,
        python: str = sys.executable,
        entry_point: Sequence[str] = ENTRY_POINT,
        say: Callable[[str], None] = print,
        status_every_s: float = 60.0,
    ):
        if parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {parallel}")
        self.spec = spec
        self.parallel = parallel
        self.threads = threads_per_cell or max(1, (os.cpu_count() or 1) // parallel)
        self.retry_failed = retry_failed
        self.python = python
        self.entry_point = tuple(entry_point)
        self.say = say
        self.status_every_s = status_every_s
        self._stop_signal: Optional[int] = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _todo(self, report: GridReport) -> list[Cell]:
        todo = []
        for cell in self.spec.cells():
            state = cell_state(cell, self.spec.train_iters)
            if state.state == FINISHED:
                report.skipped.append(cell)
            elif state.state == FAILED and not self.retry_failed:
                report.failed.append(cell)
            else:
                todo.append(cell)
        return todo

    def _progress(self, report, running, pending, start, durations) -> str:
        done = len(report.finished) + len(report.skipped)
        total = len(self.spec.cells())
        elapsed = time.time() - start
        line = (
            f"[grid] {done}/{total} done · {len(running)} running · {len(report.failed)} failed · "
            f"{len(pending)} pending · {_hms(elapsed)} elapsed"
        )
        if durations and (pending or running):
            mean = sum(durations) / len(durations)
            left = (len(pending) + len(running) / 2) * mean / self.parallel
            line += f" · ~{_hms(left)} left"
        return line

    # -- processes ---------------------------------------------------------------------------
    def _start(self, cell: Cell) -> _Running:
        write_recipe(cell)
        os.makedirs(cell.logs, exist_ok=True)
        attempt = read_status(cell).get("attempts", 0) + 1
        log_path = os.path.join(cell.logs, f"attempt{attempt}.log")
        log = open(log_path, "a", encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [self.python, *self.entry_point, *cell.argv(self.spec.train_args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches the runner, which forwards SIGTERM
        )
        write_status(cell, state="running", attempts=attempt, log=log_path, pid=process.pid)
        return _Running(cell, process, time.time(), log)

    def _finish(self, run: _Running, code: int, report: GridReport, durations: list) -> str:
        run.log.close()
        seconds = time.time() - run.started
        total = read_status(run.cell).get("seconds", 0.0) + seconds
        iteration = cell_state(run.cell, self.spec.train_iters).iteration
        if code == 0 and iteration >= self.spec.train_iters:
            write_status(run.cell, state=FINISHED, exit_code=0, seconds=total)
            report.finished.append(run.cell)
            durations.append(total)
            return f"finished {run.cell.name} in {_hms(seconds)}"
        if self._stop_signal is not None or code == 0:
            write_status(run.cell, state=INTERRUPTED, exit_code=code, seconds=total)
            report.interrupted.append(run.cell)
            return f"interrupted {run.cell.name} at iteration {iteration} (resumes on re-run)"
        write_status(run.cell, state=FAILED, exit_code=code, seconds=total)
        report.failed.append(run.cell)
        return (
            f"FAILED {run.cell.name} (exit {code}) after {_hms(seconds)}; "
            f"log: {run.log.name}\n{_tail(run.log.name)}"
        )

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> GridReport:
        report = GridReport()
        pending = self._todo(report)
        start = time.time()
        running: list[_Running] = []
        durations: list[float] = []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        forwarded = started = False
        last_status = time.time()
        self.say(
            f"[grid] {len(self.spec.cells())} cells in {self.spec.out}: {len(report.skipped)} "
            f"already finished, {len(pending)} to run, {self.parallel} at a time × "
            f"{self.threads} threads"
        )
        try:
            while pending or running:
                if self._stop_signal is not None and not forwarded:
                    self.say("[grid] stopping: the running cells save and exit")
                    for run in running:
                        run.process.send_signal(signal.SIGTERM)
                    forwarded = True
                    pending = []
                while (
                    pending
                    and len(running) < self.parallel
                    and self._stop_signal is None
                    and all(_past_data_setup(r) for r in running)
                ):
                    cell = pending.pop(0)
                    state = cell_state(cell, self.spec.train_iters)
                    verb = "resuming" if state.iteration else "starting"
                    running.append(self._start(cell))
                    where = f" from iteration {state.iteration}" if state.iteration else ""
                    self.say(f"[grid] {verb} {cell.name}{where}")
                    started = True
                if started:
                    self.say(self._progress(report, running, pending, start, durations))
                    started = False
                for run in list(running):
                    code = run.process.poll()
                    if code is not None:
                        running.remove(run)
                        self.say(f"[grid] {self._finish(run, code, report, durations)}")
                        self.say(self._progress(report, running, pending, start, durations))
                if running and time.time() - last_status >= self.status_every_s:
                    last_status = time.time()
                    where = ", ".join(
                        f"{r.cell.name} iter {last_iteration(r.cell.metrics_path)}" for r in running
                    )
                    self.say(f"{self._progress(report, running, pending, start, durations)}")
                    self.say(f"[grid] running: {where}")
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        report.seconds = time.time() - start
        return report


def _past_data_setup(run: _Running) -> bool:
    """Whether a started cell has built its datasets (it logs its metrics path right after).

    Cells start one at a time until then: cells with the same seed share megatron-core's index
    cache, whose files are written in place, and two processes building them at once could read
    each other's half-written files."""
    if run.process.poll() is not None:
        return True
    try:
        with open(run.log.name, encoding="utf-8", errors="replace") as f:
            return any(line.split(" ", 1)[-1].startswith("metrics: ") for line in f)
    except OSError:
        return False


def _tail(path: Optional[str], lines: int = 8) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().splitlines()[-lines:]
    return "\n".join("    | " + line for line in text)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
