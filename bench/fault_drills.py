"""Fault drills: ``pretrain_gpas.py`` under ``torchrun`` with faults injected from outside, as a
cluster meets them (SIGKILL, SIGSTOP, a throttle by SIGSTOP/SIGCONT cycles), or from inside
through a ``sitecustomize`` on the workers' path. Used by ``bench_faults.py`` and the fault
tests."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from megatron_ext.platform.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_args(
    save: str, iters: int = 6, model_size: str = "tiny4", device: str = "cpu", **extra
) -> list[str]:
    """``pretrain_gpas.py``'s flags for a small run on mock data, checkpointed under ``save``
    (the fault drills' and the integration tests' run); ``extra`` flags as keyword arguments
    (``save_interval=4`` → ``--save-interval 4``, ``True`` → the bare flag)."""
    args = ["--device", device, "--model-size", model_size, "--norm-type", "pre_gpas",
            "--mock-data", "--vocab-size", "512", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--clip-grad", "1.0", "--clip-gate-grad", "0.01",
            "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--seed", "7",
            "--num-workers", "0", "--save", save, "--load", save]  # fmt: skip
    for name, value in extra.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


@dataclass
class Launch:
    returncode: int
    lines: list = field(default_factory=list)
    seconds: float = 0.0
    events: dict = field(default_factory=dict)  # what the injector did, and when

    @property
    def text(self) -> str:
        return "".join(self.lines)


def process_with_env(**env) -> int | None:
    """The pid of a running ``pretrain_gpas.py`` whose environment holds every ``NAME=value``
    given (the interpreter itself, not a shell wrapping it)."""
    out = subprocess.run(["pgrep", "-f", "pretrain_gpas.py"], capture_output=True, text=True)
    wanted = [f"{k}={v}".encode() for k, v in env.items()]
    for pid in out.stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if all(w in environ for w in wanted) and cmdline.startswith(sys.executable.encode()):
            return int(pid)
    return None


def worker_pid(rank: int, attempt: int) -> int | None:
    """The pid of ``pretrain_gpas.py`` rank ``rank`` in torchrun attempt ``attempt``."""
    return process_with_env(RANK=rank, TORCHELASTIC_RESTART_COUNT=attempt)


def torchrun(args, *, max_restarts=0, nproc=2, fault=None, at_iteration=None, fault_rank=1,
             sitecustomize=None, tmp_path=None, timeout=600) -> Launch:  # fmt: skip
    """Run ``pretrain_gpas.py args`` under torchrun; ``fault`` ("kill", "freeze", "throttle")
    hits rank ``fault_rank`` of the first attempt when iteration ``at_iteration`` is logged."""
    marker = f"{os.getpid()}-{time.time_ns()}"  # inherited by everything the launch starts
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPAS_TEST_LAUNCH=marker)
    if sitecustomize is not None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(sitecustomize)
        env["PYTHONPATH"] = os.pathsep.join([str(site), ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--master-port", str(free_port()),
           os.path.join(ROOT, "pretrain_gpas.py"), *args]  # fmt: skip
    launch = Launch(returncode=-1)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
    stop_throttle = threading.Event()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = t0 + timeout
    try:
        for line in _lines_until_exit(proc, lines, deadline):
            launch.lines.append(line)
            if (
                fault
                and "fault" not in launch.events
                and at_iteration is not None
                and re.search(rf"iter\s+{at_iteration}/", line)
            ):
                pid = worker_pid(fault_rank, 0)
                launch.events["fault"] = time.time()
                if fault == "kill":
                    os.kill(pid, signal.SIGKILL)
                elif fault == "freeze":
                    os.kill(pid, signal.SIGSTOP)
                elif fault == "throttle":
                    threading.Thread(
                        target=_throttle, args=(pid, stop_throttle), daemon=True
                    ).start()
            if "resumed from iteration" in line and "fault" in launch.events:
                launch.events.setdefault("resumed", time.time())
            if re.search(r"iter\s+\d+/", line) and "resumed" in launch.events:
                launch.events.setdefault("first_new_step", time.time())
        launch.returncode = proc.wait()
    finally:
        stop_throttle.set()
        with contextlib.suppress(ProcessLookupError):  # whatever the launch left behind
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_marked(marker)
    launch.seconds = time.time() - t0
    return launch


def _kill_marked(marker: str) -> None:
    """Processes of the launch that left its process group: a rank killed from outside leaves
    the queue manager of megatron-core's checkpoint writer running (in its own session)."""
    wanted = f"GPAS_TEST_LAUNCH={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if wanted in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _lines_until_exit(proc, lines: queue.Queue, deadline: float):
    """The launch's output lines until torchrun has exited and its output is drained (a
    process it left behind may keep the pipe open); kills it at ``deadline``."""
    exited_at = None
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line is None:
            return
        if line:
            yield line
            continue
        if proc.poll() is not None:
            exited_at = exited_at or time.time()
            if time.time() - exited_at > 2.0:
                return
        elif time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)


def _throttle(pid: int, stop: threading.Event, run_s=0.02, pause_s=0.04) -> None:
    """Let the process run a third of the time: SIGSTOP/SIGCONT cycles until it exits."""
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(pause_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(run_s)
        except ProcessLookupError:
            return
