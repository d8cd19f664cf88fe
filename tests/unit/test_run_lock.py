"""One run per --save directory: a live holder refuses a second run; a gone one is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_ext.resilience.run_lock import LOCK_FILE, RunLock, RunLockError


def _plant(directory, host, pid, job=None, age_s=0.0, **torchrun):
    """A lock left by another run (``torchrun_id``, ``attempt``: one started by torchrun)."""
    path = os.path.join(directory, LOCK_FILE)
    holder = {"host": host, "pid": pid, "slurm_job_id": job, "started": time.time() - 3600}
    holder.update(torchrun)
    with open(path, "w") as f:
        json.dump(holder, f)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_first_run_takes_the_lock_and_releases_it(tmp_path):
    lock = RunLock(str(tmp_path / "save"))
    assert lock.acquire() is None
    body = json.load(open(lock.path))
    assert (body["host"], body["pid"]) == (socket.gethostname(), os.getpid())
    lock.release()
    assert not os.path.exists(lock.path)


def test_a_live_holder_on_this_host_refuses_a_second_run(tmp_path):
    parent = os.getppid()  # alive while this test runs
    path = _plant(tmp_path, socket.gethostname(), parent, job="4242")
    with pytest.raises(RunLockError) as err:
        RunLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert f"--save {tmp_path} is in use by another run" in message
    assert f"pid {parent}, SLURM job 4242" in message and socket.gethostname() in message
    assert json.load(open(path))["pid"] == parent  # the holder's lock is untouched


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    pid = _dead_pid()
    _plant(tmp_path, socket.gethostname(), pid)
    lock = RunLock(str(tmp_path))
    note = lock.acquire()
    assert f"pid {pid} is not running" in note and "took over" in note
    assert json.load(open(lock.path))["pid"] == os.getpid()
    assert os.listdir(tmp_path) == [LOCK_FILE]  # the stale lock does not linger


def test_another_host_is_trusted_until_its_heartbeat_is_stale(tmp_path):
    _plant(tmp_path, "node-elsewhere", 12345, age_s=60)
    with pytest.raises(RunLockError, match="host node-elsewhere, pid 12345"):
        RunLock(str(tmp_path), stale_after_s=600).acquire()
    _plant(tmp_path, "node-elsewhere", 12345, age_s=900)
    note = RunLock(str(tmp_path), stale_after_s=600).acquire()
    assert "no heartbeat for 15 min" in note


def test_a_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    _plant(tmp_path, "node-elsewhere", 12345, job="777")
    note = RunLock(str(tmp_path)).acquire()
    assert "an earlier run of this SLURM job 777, requeued" in note


def test_a_restarted_torchrun_attempt_takes_over_the_attempt_before(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    _plant(tmp_path, "node-elsewhere", 12345, torchrun_id="job-a", attempt=1)
    note = RunLock(str(tmp_path)).acquire()
    assert "attempt 1 of this torchrun job, restarted" in note
    # the same attempt (a second run started by hand in it), or another job: refused
    for planted in ({"torchrun_id": "job-a", "attempt": 2}, {"torchrun_id": "job-b", "attempt": 0}):
        other = tmp_path / str(planted["torchrun_id"] + str(planted["attempt"]))
        other.mkdir()
        _plant(other, "node-elsewhere", 12345, **planted)
        with pytest.raises(RunLockError, match="is in use by another run"):
            RunLock(str(other)).acquire()


def test_heartbeat_stops_while_the_run_makes_no_progress(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    lock.start_heartbeat(every_s=0.02, stalled_after_s=0.1)
    time.sleep(0.5)  # no progress noted since the start: stalled from here on
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert os.path.getmtime(lock.path) == pytest.approx(old)  # hung: the lock goes stale
    lock.note_progress()
    deadline = time.time() + 10
    while os.path.getmtime(lock.path) < old + 500 and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.getmtime(lock.path) > old + 500
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    lock.start_heartbeat(every_s=0.05)
    deadline = time.time() + 10
    while os.path.getmtime(lock.path) < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.getmtime(lock.path) > old + 500
    lock.release()


def test_release_leaves_another_runs_lock_alone(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    _plant(tmp_path, "node-elsewhere", 12345)  # e.g. it took over after we stalled
    lock.release()
    assert json.load(open(lock.path))["host"] == "node-elsewhere"
