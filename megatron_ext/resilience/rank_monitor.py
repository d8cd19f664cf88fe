"""One hang monitor per rank, outside the rank's process: NVIDIA's resiliency extension's rank
monitor (``nvidia_resiliency_ext.fault_tolerance``) in a child process, so that ``torchrun`` and
``srun`` launches need no other launcher.

A frozen process cannot watch itself, and a gloo collective cannot be interrupted from inside;
the monitor is a separate process that the rank tells, over a Unix socket, when each section
(a step, or a phase: setup, checkpoint load, save, finalize, evaluation) starts and ends. When a
section, or the time between sections, outlasts its timeout, the monitor sends
:data:`DUMP_SIGNAL`: the rank's ``faulthandler`` writes every thread's Python stack (it runs in
the signal handler itself, so it works inside a blocked collective); it prints one line naming
the rank, host, phase and last finished iteration, and waits two check intervals (the other
ranks, stuck in a collective with this one, are found and dumped in that time too). If the rank
is still stuck, the monitor sends :data:`HANG_SIGNAL`: a second dump, and the rank dies of the
signal, an exit status no crash and no input error has.

What this adds to NVRx 0.4.1's monitor (``RankMonitorServer``; its constructor,
``_handle_timeout``, ``_handle_signal`` and ``_rank_monitor_loop`` are relied on, hence the
pinned version): the line, the grace interval, a monitor that dies with its rank
(``PR_SET_PDEATHSIG``; NVRx's own outlives a rank killed by a signal), and a stuck rank stopped,
its stack written, when the launcher ends the job first (NVRx's monitor just exits: a frozen
rank then waits for the launcher's SIGKILL and leaves no stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time

import psutil
from nvidia_resiliency_ext.fault_tolerance import FaultToleranceConfig, RankMonitorServer
from nvidia_resiliency_ext.fault_tolerance.rank_monitor_server import RankMonitorLogger

HANG_SIGNAL = signal.SIGUSR2  # what a hung rank dies of (a shell sees 128 + 12 = 140)
DUMP_SIGNAL = signal.SIGURG  # its stack, written at once (ignored by default, unused by us)
OUT_OF_SECTION = "between steps"
_PR_SET_PDEATHSIG = 1


def monitor_config(sections: dict, out_of_section: float) -> FaultToleranceConfig:
    """Section timeouts only (no heartbeats), checked a few times per shortest timeout."""
    shortest = min([out_of_section, *[t for t in sections.values() if t]])
    return FaultToleranceConfig(
        workload_check_interval=max(0.2, min(5.0, shortest / 4)),
        initial_rank_heartbeat_timeout=None,
        rank_heartbeat_timeout=None,
        rank_section_timeouts=dict(sections),
        rank_out_of_section_timeout=out_of_section,
        rank_termination_signal=HANG_SIGNAL,
        enable_nic_monitor=False,
        node_health_check_interval=3600.0,
        log_level=logging.ERROR,  # the line below says what happened
    )


class _Server(RankMonitorServer):
    """NVRx's monitor, announcing a hang in one line before it stops the rank."""

    def __init__(self, *args, rank: int, iteration, stacks: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.iteration, self.stacks = rank, iteration, stacks
        self.announced = False

    async def _periodic_node_health_check(self):
        """GPU health is not what this monitor is for (and NVML is absent on CPU)."""

    async def _handle_timeout(self):
        if self.rank_info is None:
            return
        if not self.announced:
            self.announced = True
            grace = 2 * self.cfg.workload_check_interval  # the peers' monitors find it too
            phase, stalled = self._where()
            _signal(self.rank_info.pid, DUMP_SIGNAL)  # every stuck rank's stack, before any dies
            print(self._hang_line(phase, stalled, grace), file=sys.stderr, flush=True)
            await asyncio.sleep(grace)
            if self.rank_info is None:
                return  # it exited meanwhile (a peer was stopped first)
            if not self._is_section_timeout_elapsed(time.monotonic()):
                self.announced = False
                moved_on = (
                    f"hang: rank {self.rank} moved on after all; not stopped (raise "
                    "--hang-timeout if that phase is this slow)"
                )
                print(moved_on, file=sys.stderr, flush=True)
                return
        self._stop_rank()

    def _handle_signal(self, sig):
        """The launcher ending the job (torchrun signals each rank's process group, this
        monitor with it) would leave a frozen rank to its SIGKILL, its stack never written:
        a rank that is stopped, or still hung after its announced grace began, is stopped now."""
        if sig in (signal.SIGTERM, signal.SIGINT) and self._rank_is_stuck():
            print(f"hang: rank {self.rank} stopped now: the job is ending", file=sys.stderr,
                  flush=True)  # fmt: skip
            self._stop_rank()
        super()._handle_signal(sig)

    def _rank_is_stuck(self) -> bool:
        if self.rank_info is None:
            return False
        try:
            stopped = psutil.Process(self.rank_info.pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False
        return stopped or (self.announced and self._is_section_timeout_elapsed(time.monotonic()))

    def _stop_rank(self) -> None:
        """SIGCONT and :data:`HANG_SIGNAL` (NVRx's shutdown): the rank writes its stack and dies;
        then what it started (data workers, a checkpoint writer's queue manager), which would
        hold the launcher's output open."""
        descendants = self._descendants()
        self._shutdown_rank_if_alive()
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def _hang_line(self, phase: str, stalled: float, grace: float) -> str:
        return (
            f"hang: rank {self.rank} on {socket.gethostname()} (pid {self.rank_info.pid}) made "
            f"no progress for {stalled:.0f} s in {phase} after iteration "
            f"{self.iteration.value}; its stack is in {self.stacks}; stopping it in "
            f"{grace:.0f} s"
        )

    def _descendants(self) -> list:
        try:
            children = psutil.Process(self.rank_info.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c for c in children if c.pid != os.getpid()]

    def _where(self) -> tuple[str, float]:
        """The innermost open phase (the one most recently begun) and the seconds spent in it."""
        now = time.monotonic()
        if self.open_sections:
            phase, started = max(self.open_sections.items(), key=lambda kv: kv[1])
        else:
            phase, started = OUT_OF_SECTION, self.out_of_section_time
        return phase, now - started


def _signal(pid: int, sig: int) -> None:
    """Without SIGCONT: a stopped rank stays stopped (and writes its stack once NVRx continues
    it to stop it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _serve(cfg, socket_path, ready, rank, iteration, stacks) -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # die with the rank
    # This process is the monitor's alone: its own log levels. It reports hangs in its line;
    # NVIDIA's GPU health check is not used, and its shutdown by signal is no error.
    logging.getLogger("nvidia_resiliency_ext").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logger = RankMonitorLogger(level=cfg.log_level, is_restarter_logger=False)
    server = _Server(cfg, socket_path, ready, False, logger, rank=rank, iteration=iteration,
                     stacks=stacks)  # fmt: skip
    try:
        asyncio.run(server._rank_monitor_loop())
    except asyncio.CancelledError:
        pass


def start_monitor(
    cfg: FaultToleranceConfig, socket_path: str, *, rank: int, iteration, stacks: str
) -> multiprocessing.Process:
    """Fork the monitor (before the process group and CUDA exist) and wait until it listens.
    ``iteration``: a shared ``RawValue`` the rank keeps at its last finished iteration."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    process = ctx.Process(
        target=_serve,
        args=(cfg, socket_path, ready, rank, iteration, stacks),
        name=f"gpas-rank-monitor-{rank}",
        daemon=True,
    )
    process.start()
    if not ready.wait(timeout=RankMonitorServer.RANK_MONITOR_INIT_TIMEOUT):
        process.kill()
        raise RuntimeError(f"the rank monitor of rank {rank} did not start")
    return process


def stop_monitor(process: multiprocessing.Process) -> None:
    if process.is_alive():
        os.kill(process.pid, signal.SIGTERM)
        process.join(timeout=5)
