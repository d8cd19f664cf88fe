"""The hang monitor when the launcher ends the job first: torchrun signals each rank's process
group, the rank's monitor with it. A rank that is frozen (stopped), or still stuck after its hang
was announced, must be stopped by its monitor then, its stack written; a healthy rank is left to
the launcher's signal."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT

pytest.importorskip("nvidia_resiliency_ext")

HANG_TIMEOUT = 8.0  # checked every 2 s; the monitor's own grace after announcing: 4 s

RANK = """
import sys, time, types
from megatron_ext.config import FaultConfig
from megatron_ext.training.contract import SETUP
from megatron_ext.training.components.hang_watchdog import HangWatchdog

watchdog = HangWatchdog(FaultConfig(hang_timeout=float(sys.argv[2])), sys.argv[1], rank=0,
                        distributed_timeout_minutes=30.0)
watchdog.phase_started(SETUP, 0)
watchdog.phase_ended(SETUP, 0)
watchdog.before_step(1)  # the first step has the start's timeout; the second, --hang-timeout
watchdog.after_step(types.SimpleNamespace(iteration=1))
watchdog.before_step(2)

def the_step_that_never_ends():
    print(watchdog._monitor.pid, flush=True)  # from inside: a stop now finds the rank here
    while True:
        time.sleep(0.05)

the_step_that_never_ends()
"""


class _Rank:
    def __init__(self, tmp_path):
        self.run_dir = tmp_path / "run"
        self.stderr = tmp_path / "stderr.txt"
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONPATH=ROOT)
        with open(self.stderr, "w") as stderr:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RANK, str(self.run_dir), str(HANG_TIMEOUT)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env,
            )  # fmt: skip
        self.monitor = int(self.proc.stdout.readline())

    def log(self) -> str:
        return self.stderr.read_text()

    def stack(self) -> str:
        return (self.run_dir / "stacks" / "rank0.txt").read_text()

    def wait_for(self, text: str, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while text not in self.log():
            assert time.monotonic() < deadline, f"no {text!r} in: {self.log()}"
            time.sleep(0.05)

    def exit_status(self, within_s: float):
        try:
            return self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        with_children = psutil.Process(self.proc.pid).children(recursive=True)
        for p in [self.proc, *with_children]:
            p.kill()
        self.proc.wait()


@pytest.fixture
def rank(tmp_path):
    rank = _Rank(tmp_path)
    yield rank
    if rank.proc.poll() is None:
        rank.kill()


def _ended(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_frozen_rank_is_stopped_with_its_stack_when_the_job_ends_during_the_grace(rank):
    os.kill(rank.proc.pid, signal.SIGSTOP)
    rank.wait_for("made no progress for", within_s=HANG_TIMEOUT + 5)
    os.kill(rank.monitor, signal.SIGTERM)  # the launcher's teardown, before the grace is over
    assert rank.exit_status(within_s=3) == -signal.SIGUSR2, rank.log()
    assert "the_step_that_never_ends" in rank.stack()
    assert "hang: rank 0 stopped now: the job is ending" in rank.log()


def test_a_frozen_rank_is_stopped_with_its_stack_when_the_job_ends_before_its_timeout(rank):
    os.kill(rank.proc.pid, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(rank.monitor, signal.SIGTERM)
    assert rank.exit_status(within_s=3) == -signal.SIGUSR2, rank.log()
    assert "the_step_that_never_ends" in rank.stack()


def test_a_running_rank_is_left_alone_when_its_monitor_is_ended(rank):
    os.kill(rank.monitor, signal.SIGTERM)
    assert _ended(rank.monitor, within_s=10)
    assert rank.exit_status(within_s=2) is None  # still running: the launcher's signal is its own
    assert "hang:" not in rank.log()
