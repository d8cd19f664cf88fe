"""Faults of a long run, through the command line on CPU: a kill during a (background) save, a
damaged checkpoint, a full disk, two runs on one --save, loss spikes. (SIGTERM and the
pointer naming a missing checkpoint: test_training.py and test_input_errors.py.)"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_ext.resilience import exit_codes
from tests.helpers import ROOT
from tests.helpers.cli_runs import base_args, losses, spawn, step_metrics
from tests.helpers.dist_workers import run_ranks

pytestmark = pytest.mark.slow

POINTER = "latest_checkpointed_iteration.txt"


def _cli(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc


def _error_line(proc) -> str:
    """The run says what went wrong in exactly one ``error:`` line, and no traceback."""
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _pointer(save) -> int:
    return int(open(os.path.join(save, POINTER)).read())


def _listing(path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished run with checkpoints at iterations 3 and 6 (copied per test)."""
    save = str(tmp_path_factory.mktemp("six") / "run")
    proc = _cli(base_args(save, iters=6, save_interval=3))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


@pytest.fixture
def run(six_steps, tmp_path):
    import shutil

    save = str(tmp_path / "run")
    shutil.copytree(six_steps, save)
    return save


def _damage(save, how):
    shard = os.path.join(save, "iter_0000006", "__0_0.distcp")
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(1000)
    else:  # one byte flipped: same size, only the checksum sees it
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    return shard


# --- a kill during a save ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    """SIGKILL while iter_N.tmp is being written (by the background writer with --async-save):
    the pointer still names a complete checkpoint, and the resume continues exactly."""
    save = str(tmp_path / "run")
    extra = {"async_save": True} if mode == "async" else {}
    proc = spawn(base_args(save, iters=400, save_interval=1, **extra))
    deadline, killed_in_save = time.time() + 120, False
    while time.time() < deadline:
        entries = os.listdir(save) if os.path.isdir(save) else []
        writing = any(e.startswith("iter_") and e.endswith(".tmp") for e in entries)
        if writing and POINTER in entries:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_in_save = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_in_save
    latest = _pointer(save)
    before = step_metrics(os.path.join(save, "metrics.jsonl"))
    resumed = spawn(base_args(save, iters=latest + 3, **extra))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from iteration {latest}" in out
    assert "took over the lock" in out and "is not running" in out  # the killed run's lock
    after = step_metrics(os.path.join(save, "metrics.jsonl"))
    for it in range(latest + 1, latest + 4):  # the killed run logged these before the kill
        if it in before["lm_loss"]:
            assert after["lm_loss"][it] == before["lm_loss"][it], it
            assert after["grad_norm"][it] == before["grad_norm"][it], it


# --- a damaged checkpoint ----------------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(run):
    straight = step_metrics(os.path.join(run, "metrics.jsonl"))
    shard = _damage(run, "truncated")
    proc = _cli(base_args(run, iters=6))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"checkpoint {run}/iter_0000006 is damaged: {shard}: 1,000 bytes" in out
    assert "set aside as iter_0000006.damaged" in out
    assert "resumed from iteration 3" in out
    assert os.path.isdir(os.path.join(run, "iter_0000006.damaged"))  # kept for inspection
    assert _pointer(run) == 6 and os.path.isdir(os.path.join(run, "iter_0000006"))  # re-saved
    again = step_metrics(os.path.join(run, "metrics.jsonl"))
    for it in (4, 5, 6):  # the same steps as the uninterrupted run, bit for bit
        assert again["lm_loss"][it] == straight["lm_loss"][it]
        assert again["grad_norm"][it] == straight["grad_norm"][it]


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_checkpoint_with_stop_is_one_line_and_touches_nothing(run, how):
    shard = _damage(run, how)
    before = _listing(run)
    proc = _cli(base_args(run, iters=8, on_damaged_checkpoint="stop"))
    assert proc.returncode == exit_codes.STOPPED
    line = _error_line(proc)
    what = "1,000 bytes" if how == "truncated" else "contents differ from the manifest (SHA-256)"
    assert line.startswith(f"error: checkpoint {run}/iter_0000006 is damaged: {shard}: {what}")
    assert "--on-damaged-checkpoint fallback" in line
    assert _listing(run) == before


def test_checkpoint_without_a_manifest_still_loads(run):
    """Checkpoints written before manifests existed resume as before (unverified)."""
    os.remove(os.path.join(run, "iter_0000006", "manifest.json"))
    proc = _cli(base_args(run, iters=7))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from iteration 6" in proc.stderr


def test_missing_pointer_resumes_from_the_newest_complete_checkpoint(run):
    """A crash between the rename and the pointer's first write: the manifest shows which
    directories are complete. Without manifests, which one to trust is the user's call."""
    os.remove(os.path.join(run, POINTER))
    proc = _cli(base_args(run, iters=7))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run}/iter_0000006 (the newest intact checkpoint)" in proc.stderr
    assert _pointer(run) == 7

    os.remove(os.path.join(run, POINTER))
    for it in (3, 6, 7):
        os.remove(os.path.join(run, f"iter_{it:07d}", "manifest.json"))
    proc = _cli(base_args(run, iters=8))
    assert proc.returncode == exit_codes.STOPPED
    line = _error_line(proc)
    assert f"--load {run}: holds iter_0000007 but no {POINTER} pointer" in line


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only: CI runs as root on the same kind of machine)."""
    mounted = []

    def make(size_kib: int) -> str:
        path = str(tmp_path / f"disk{len(mounted)}")
        os.makedirs(path)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", path], check=False)


def test_too_little_space_is_refused_before_training(small_disk):
    disk = small_disk(2048)
    save = os.path.join(disk, "run")
    proc = _cli(base_args(save, iters=6, save_interval=3))
    assert proc.returncode == exit_codes.STOPPED
    line = _error_line(proc)
    assert line.startswith(f"error: --save {save}: 2.0 MiB free, a checkpoint needs about")
    assert "iter " not in proc.stdout + proc.stderr  # not one step trained
    assert _listing(disk) == {}  # nothing written (the lock is released)


def test_space_running_out_between_checkpoints_stops_cleanly(small_disk):
    disk = small_disk(6144)  # holds the first checkpoint (3.4 MiB), not a second
    save = os.path.join(disk, "run")
    proc = _cli(base_args(save, iters=6, save_interval=3))
    assert proc.returncode == exit_codes.STOPPED
    line = _error_line(proc)
    assert line.startswith(f"error: --save {save}: ") and "checkpoint 6 needs about 3.4 MiB" in line
    assert _pointer(save) == 3
    assert sorted(e for e in os.listdir(save) if e.startswith("iter_")) == ["iter_0000003"]


def _enospc_worker(save, failing_rank):
    """Train on 2 ranks; the second checkpoint's write fails on one rank with ENOSPC."""
    import errno

    from megatron_ext.cli import pretrain

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        target = str(f)
        if "iter_0000004" in target and torch.distributed.get_rank() == failing_rank:
            raise OSError(errno.ENOSPC, "No space left on device", target)
        return real_save(obj, f, *args, **kwargs)

    torch.save = failing_save
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        args = base_args(save, iters=6, save_interval=2, use_distributed_optimizer=True)
        code = pretrain.main(args)
    return code, err.getvalue()


def test_a_failing_write_on_one_rank_keeps_the_previous_checkpoint(tmp_path):
    save = str(tmp_path / "run")
    results = run_ranks(_enospc_worker, 2, (save, 1), tmp_path)
    assert [code for code, _ in results] == [exit_codes.STOPPED] * 2  # every rank stops, none hangs
    errors = [[x for x in err.splitlines() if x.startswith("error: ")] for _, err in results]
    assert len(errors[0]) == 1 and errors[1] == [], errors  # one line, from rank 0
    assert "Traceback" not in results[0][1] + results[1][1]
    line = errors[0][0]
    assert line.startswith(f"error: could not write checkpoint {save}/iter_0000004: ")
    assert "No space left on device" in line
    assert "the previous checkpoint (iteration 2) and the pointer are intact" in line
    assert _pointer(save) == 2
    assert sorted(e for e in os.listdir(save) if e.startswith("iter_")) == ["iter_0000002"]
    # a deliberate stop: the restart ledger says so, and a restart would be refused
    with open(os.path.join(save, "restarts.json")) as f:
        assert json.load(f)[-1]["stopped"]["exit"] == 3


# --- one run per --save --------------------------------------------------------------------------


def test_a_second_run_on_the_same_save_is_refused_then_takes_over_a_dead_one(tmp_path):
    """The refused run leaves the live run's files alone: its hang watchdog's stack file too."""
    save = str(tmp_path / "run")
    first = spawn(base_args(save, iters=400, hang_timeout=600))
    metrics = os.path.join(save, "metrics.jsonl")
    stacks = os.path.join(save, "stacks", "rank0.txt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and losses(metrics)):
        time.sleep(0.1)
    try:
        with open(stacks) as f:
            live_stacks = f.read()
        assert live_stacks.startswith(f"--- pid {first.pid} started ")
        second = _cli(base_args(save, iters=5, hang_timeout=600))
        assert second.returncode == exit_codes.BAD_INPUT
        line = _error_line(second)
        assert line.startswith(f"error: --save {save} is in use by another run (host ")
        assert f"{socket.gethostname()}, pid {first.pid}" in line
        with open(stacks) as f:
            assert f.read() == live_stacks  # neither appended to nor removed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = _cli(base_args(save, iters=3))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of the run on host {socket.gethostname()}, pid {first.pid}" in (
        third.stdout + third.stderr
    )
    assert not os.path.exists(os.path.join(save, "run.lock"))  # released at exit


def _progress_worker(save):
    """A short run; how many times it told its lock it made progress."""
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.resilience.run_lock import RunLock
    from megatron_ext.training.trainer import run

    notes = []
    noted = RunLock.note_progress

    def note_progress(self):
        notes.append(None)
        noted(self)

    RunLock.note_progress = note_progress
    run(parse_run_config(base_args(save, iters=4, save_interval=2, eval_interval=2)))
    return len(notes)


def test_the_lock_heartbeat_is_kept_alive_by_steps_and_phases(tmp_path):
    """The lock's heartbeat beats only while the run notes progress (a hung run's lock goes
    stale): every step's start and end and every save and evaluation note it."""
    (notes,) = run_ranks(_progress_worker, 1, (str(tmp_path / "run"),), tmp_path)
    steps, phases = 4, 2 * (2 + 2) + 1  # saves at 2, 4; evaluations at 2, 4; end of setup
    assert notes >= 2 * steps + phases + 1  # + the heartbeat's start


# --- loss spikes ---------------------------------------------------------------------------------


def _spike_worker(save, skip):
    """20 ordinary steps, then one whose logits are scaled 30× (a test hook)."""
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.components.counters import RunCounters
    from megatron_ext.training.trainer import Trainer

    extra = {"skip_spiky_steps": True} if skip else {}
    trainer = Trainer(parse_run_config(base_args(save, iters=24, **extra)))
    trainer.setup()
    gpt = trainer.model[0].module
    seen = {}

    def spike(module, inputs, output):
        if trainer.state.iteration == 20:
            if "before" not in seen:
                seen["before"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
                seen["lr_steps"] = trainer.scheduler.num_steps
            logits, bias = output
            return logits * 30.0, bias
        if trainer.state.iteration == 21 and "after" not in seen:
            seen["after"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
            seen["lr_steps_after"] = trainer.scheduler.num_steps
        return output

    gpt.output_layer.register_forward_hook(spike)
    with trainer:
        trainer.train()
    unchanged = all(torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    return {
        "unchanged": unchanged,
        "lr_advanced": seen["lr_steps_after"] - seen["lr_steps"],
        "skipped": trainer.components.find(RunCounters).skipped_total,
        "iteration": trainer.state.iteration,
    }


@pytest.mark.parametrize("skip", [False, True], ids=["logged", "skipped"])
def test_an_injected_spike_is_logged_and_skipped_on_request(tmp_path, skip):
    import json

    save = str(tmp_path / "run")
    (result,) = run_ranks(_spike_worker, 1, (save, skip), tmp_path)
    records = [json.loads(x) for x in open(os.path.join(save, "metrics.jsonl"))]
    spikes = [r for r in records if r.get("spike")]
    assert [r["iteration"] for r in spikes] == [21]
    assert spikes[0]["spike_sigmas"] > 6 and spikes[0]["spike_skipped"] is skip
    assert "loss" in spikes[0]["spike"] or "grad_norm" in spikes[0]["spike"]
    steps = {r["iteration"]: r for r in records if "lm_loss" in r}
    assert steps[24]["spikes_total"] == 1
    assert result["iteration"] == 24  # the run goes on (a spike is not a NaN)
    assert result["unchanged"] is skip  # the spiky update was skipped only on request
    assert result["lr_advanced"] == (0 if skip else 1)
    assert result["skipped"] == (1 if skip else 0)


def _late_peer_worker(timeout_minutes: float, late_seconds: float):
    """Rank 1 enters the collective late; rank 0 must fail after the process-group timeout
    rather than wait for it."""
    import time

    import torch

    from megatron_ext.config import ParallelConfig
    from megatron_ext.platform.distributed import init_distributed

    init_distributed(ParallelConfig(distributed_timeout_minutes=timeout_minutes), device="cpu")
    if torch.distributed.get_rank() == 1:
        time.sleep(late_seconds)
        return None
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except RuntimeError as err:
        return time.monotonic() - start, str(err)[:200]
    return time.monotonic() - start, None


def test_distributed_timeout_minutes_bounds_a_wait_for_a_stuck_peer(tmp_path):
    """--distributed-timeout-minutes 0.05 (3 s): a peer 10 s late fails the collective in
    about 3 s, not after 10 (and not after the 30-minute default)."""
    from tests.helpers.dist_workers import run_ranks

    (waited, error), _ = run_ranks(_late_peer_worker, 2, (0.05, 10.0), tmp_path)
    assert error is not None, "the collective did not time out"
    assert 2.0 <= waited < 9.0, (waited, error)
