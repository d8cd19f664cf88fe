"""``--hang-timeout``: a rank that finishes no step and no phase within the timeout is declared
hung by its monitor (``resilience/rank_monitor.py``), its stack written under the run directory,
and the rank stopped, so that a launcher with restarts (``torchrun --max-restarts``, the SLURM
script) resumes the run from its newest checkpoint.

The watchdog is the component that tells the monitor where the rank is: each step, and each
phase of the component contract (setup, checkpoint load, save and its finalize, evaluation), is
a section of NVRx's rank monitor, each with its own timeout.

How the timeouts nest. The start of a run (setup with its checkpoint load and data index build,
and the first step after it, where anything lazy is built) is timed by ``--hang-setup-timeout``,
by default 90% of ``--distributed-timeout-minutes``: the limit the start's collectives (the
barrier behind the rank that builds the data index) have anyway, less a margin so that the
monitor speaks first. Every later step and phase is timed by ``--hang-timeout``. With
``--calc-ft-timeouts`` the steady timeouts are learned from the run as each save begins (NVRx:
5× the longest seen, averaged with what was learned before), kept between
``min(--hang-timeout, 60 s)`` and that same 90% of the process-group timeout, and saved with the
checkpoint, so a restart starts with them; the start's timeouts are never learned (a start that
finds the data cache is no measure of one that must build it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import logging
import multiprocessing
import os
import tempfile
import time
from typing import Optional

from megatron_ext.config import FaultConfig
from megatron_ext.config.run import timeout_ceiling
from megatron_ext.training.contract import (
    CHECKPOINT_LOAD,
    CHECKPOINT_SAVE,
    PHASES,
    SETUP,
    Component,
    StepOutcome,
)

logger = logging.getLogger("gpas")

STEP = "step"
FIRST_STEP = "first step"  # the first step of each start: timed as the setup is
SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"  # where NVRx's client looks for its monitor
STACKS_DIR = "stacks"
SECTIONS = (FIRST_STEP, STEP, *PHASES)  # what the monitor times
START_SECTIONS = (SETUP, CHECKPOINT_LOAD, FIRST_STEP)  # --hang-setup-timeout; never learned
LEARNED_FLOOR_S = 60.0


def setup_timeout(cfg: FaultConfig, distributed_timeout_minutes: float) -> float:
    """``--hang-setup-timeout``, by default the ceiling."""
    if cfg.hang_setup_timeout is not None:
        return cfg.hang_setup_timeout
    return timeout_ceiling(distributed_timeout_minutes)


def stacks_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, STACKS_DIR, f"rank{rank}.txt")


class HangWatchdog(Component):
    """The trainer registers it before the setup starts, when ``--hang-timeout`` is given, so
    that it sees the setup and the checkpoint load; after the ``--save`` lock, so that only the
    run holding ``--save`` opens its stack file."""

    state_key = "hang_timeouts"

    def __init__(
        self, cfg: FaultConfig, run_dir: str, rank: int, distributed_timeout_minutes: float
    ):
        from megatron_ext.resilience import rank_monitor  # the 'resilience' extra

        self.cfg, self.rank = cfg, rank
        self.ceiling = timeout_ceiling(distributed_timeout_minutes)
        self.setup_timeout = setup_timeout(cfg, distributed_timeout_minutes)
        self._stepped = False  # a step finished since this start
        self.iteration = multiprocessing.get_context("fork").RawValue("q", 0)
        self.stacks = stacks_path(run_dir, rank)
        self._stack_file = None  # opened as the setup starts: after the --save lock is taken
        self._signals = (rank_monitor.DUMP_SIGNAL, rank_monitor.HANG_SIGNAL)
        timeout = cfg.hang_timeout
        sections = {n: self.setup_timeout if n in START_SECTIONS else timeout for n in SECTIONS}
        self._configured = sections
        self._socket = os.path.join(tempfile.gettempdir(), f"gpas_rank_monitor_{os.getpid()}")
        self._monitor = rank_monitor.start_monitor(
            rank_monitor.monitor_config(sections, timeout),
            self._socket,
            rank=rank,
            iteration=self.iteration,
            stacks=self.stacks,
        )
        self._stop_monitor = rank_monitor.stop_monitor
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient

        self.client = RankMonitorClient()
        self._open: list[str] = []
        self._seen: set[str] = set()  # sections finished at least once (they can be learned)
        self._saved_timeouts: Optional[dict] = None

    # -- sections ------------------------------------------------------------------------------
    def phase_started(self, phase: str, iteration: int) -> None:
        if phase == SETUP and not self.client.is_initialized:
            self._open_stacks()
            self._connect()  # the process group exists: the client can name its rank
            logger.info(
                "hang watchdog: %.0f s per step and phase, %.0f s for the start (setup and "
                "first step); a hung rank's stack goes to %s",
                self.cfg.hang_timeout, self.setup_timeout,
                os.path.join(os.path.dirname(self.stacks), "rankN.txt"),
            )  # fmt: skip
        if phase == CHECKPOINT_SAVE and self.cfg.calc_ft_timeouts:
            self._learn()  # collective (every rank saves); the checkpoint then keeps them
        self._start(phase)

    def phase_ended(self, phase: str, iteration: int) -> None:
        self._end(phase)

    def before_step(self, iteration: int) -> None:
        self._start(STEP if self._stepped else FIRST_STEP)

    def after_step(self, step: StepOutcome) -> None:
        self._end(STEP if self._stepped else FIRST_STEP)
        self._stepped = True
        self.iteration.value = step.iteration

    def on_start(self, state) -> None:
        self.iteration.value = state.iteration

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.shutdown_workload_monitoring()
        self._stop_monitor(self._monitor)
        if self._stack_file is None:
            return  # the setup never started (another run holds --save): its file is not ours
        for sig in self._signals:
            faulthandler.unregister(sig)
        self._stack_file.close()
        if os.path.getsize(self.stacks) and not _has_stack(self.stacks):
            with contextlib.suppress(OSError):
                os.remove(self.stacks)  # nothing but start lines: no stack was ever written

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The learned timeouts (none until some were learned)."""
        if self.client.is_initialized:
            return dict(self.client.state_dict())
        return self._saved_timeouts or {}

    def load_state_dict(self, state: dict) -> None:
        self._saved_timeouts = state
        if _describe(state) != "none" and self.cfg.calc_ft_timeouts:
            self.client.load_state_dict(state)  # NVRx replaces every section's timeout
            logger.info("hang timeouts learned by the run before: %s", _describe(state))
            self._settle()  # this launch's start timeouts, and its process-group timeout

    # -- internals -----------------------------------------------------------------------------
    def _open_stacks(self) -> None:
        """The rank's stack file, where the monitor's signals make faulthandler write. It is
        opened only once this run holds ``--save`` (the trainer registers the lock first): a run
        that the lock refuses must not write to, or remove, the live run's file."""
        os.makedirs(os.path.dirname(self.stacks), exist_ok=True)
        self._stack_file = open(self.stacks, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._stack_file.write(f"--- pid {os.getpid()} started {time.strftime('%F %T')}\n")
        self._stack_file.flush()
        for sig, dies in zip(self._signals, (False, True), strict=True):
            faulthandler.register(sig, file=self._stack_file, all_threads=True, chain=dies)

    def _connect(self) -> None:
        previous = os.environ.get(SOCKET_ENV)
        os.environ[SOCKET_ENV] = self._socket  # NVRx's client reads it while connecting
        try:
            self.client.init_workload_monitoring()
        finally:
            if previous is None:
                os.environ.pop(SOCKET_ENV, None)
            else:
                os.environ[SOCKET_ENV] = previous

    def _start(self, name: str) -> None:
        if self.client.is_initialized and name not in self._open:
            self.client.start_section(name)
            self._open.append(name)

    def _end(self, name: str) -> None:
        if name in self._open:
            self.client.end_section(name)
            self._open.remove(name)
            self._seen.add(name)

    def _learn(self) -> None:
        """Collective. NVRx sets 5× the longest time seen (averaged with what was learned
        before); a learned timeout is kept at least ``min(--hang-timeout, LEARNED_FLOOR_S)``:
        5× a step of tens of milliseconds would stop a run at its first garbage collection."""
        learnable = [s for s in SECTIONS if s not in START_SECTIONS]
        seen = [s for s in learnable if s in self._seen and s not in self._open]
        if not seen or not self.client.calculate_and_set_section_timeouts(
            selected_sections=seen, calc_out_of_section=False, skip_if_not_ready=True
        ):
            return
        self._settle()
        logger.info("hang timeouts learned: %s", _describe(self.client.state_dict()))

    def _settle(self) -> None:
        """Give the monitor this launch's timeouts: its own for the start and every section not
        learned, the learned ones bounded (:func:`settled_timeouts`)."""
        if not self.client.is_initialized:
            return
        timeouts = self.client.section_timeouts
        section, learned, capped = settled_timeouts(
            self._configured, timeouts.section, timeouts.calculated_sections,
            floor=min(self.cfg.hang_timeout, LEARNED_FLOOR_S, self.ceiling), ceiling=self.ceiling,
        )  # fmt: skip
        if capped:
            logger.warning(
                "hang timeouts learned above %.0f s (90%% of --distributed-timeout-minutes) "
                "capped: %s", self.ceiling,
                ", ".join(f"{k} {v:.1f} s" for k, v in capped.items()),
            )  # fmt: skip
        settled = dataclasses.replace(
            timeouts, section=section, calculated_sections=learned,
            out_of_section=self.cfg.hang_timeout, is_out_of_section_calculated=False,
        )  # fmt: skip
        # NVRx 0.4.1's own setter: the monitor gets the same values
        self.client._set_calculated_timeouts(new_hb_timeouts=None, new_section_timeouts=settled)


def settled_timeouts(configured: dict, section: dict, calculated, *, floor: float, ceiling: float):
    """(timeouts, learned sections, learned values capped) for the monitor: every section of
    ``configured`` (this launch's), with a learned value in its place where one was learned for
    a section after the start, kept within [floor, ceiling]. A checkpoint's learned start
    timeouts (written before the start had its own) and sections this launch does not know are
    dropped: the start keeps ``--hang-setup-timeout``."""
    out, learned, capped = dict(configured), set(), {}
    for name in calculated:
        value = section.get(name)
        if name in START_SECTIONS or name not in configured or value is None:
            continue
        out[name] = min(max(value, floor), ceiling)
        learned.add(name)
        if value > ceiling:
            capped[name] = value
    return out, learned, capped


def _describe(state: dict) -> str:
    section = (state.get("current_timeouts") or {}).get("section") or {}
    learned = section.get("calculated_sections") or {}
    timeouts = section.get("section") or {}
    return ", ".join(f"{k} {timeouts[k]:.1f} s" for k in learned if timeouts.get(k)) or "none"


def _has_stack(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(not line.startswith("--- pid ") for line in f)
