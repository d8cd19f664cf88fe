"""Dead, frozen, stuck and slow ranks under torchrun on CPU (gloo, 2 ranks, the tiny model),
faults injected from outside the process: the run is restarted inside the launch and finishes
with every iteration's loss equal to an uninterrupted run's; a hang is detected within
--hang-timeout and leaves the ranks' stacks; a fault that repeats stops the run; a throttled
rank is named."""

import os
import re

import pytest

from bench.fault_drills import torchrun
from megatron_ext.metrics_file import MetricsFile
from tests.helpers.cli_runs import base_args, step_metrics
from tests.helpers.fault_scenarios import SLOW_START, SLOW_START_S, STALL_IN_SAVE

HANG_TIMEOUT = 10  # seconds: well above a step or a save of the tiny model on a loaded CPU
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]


def _args(save, **extra):
    return base_args(save, iters=16, save_interval=4, **extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's per-iteration losses."""
    save = str(tmp_path_factory.mktemp("reference") / "run")
    launch = torchrun(_args(save))
    assert launch.returncode == 0, launch.text[-3000:]
    return step_metrics(os.path.join(save, "metrics.jsonl"))["lm_loss"]


def _finished_like(save, launch, reference):
    assert launch.returncode == 0, launch.text[-4000:]
    assert "resumed from iteration" in launch.text
    losses = step_metrics(os.path.join(save, "metrics.jsonl"))["lm_loss"]
    assert losses == reference  # {iteration: loss}, 1..16, exactly


def test_a_dead_rank_is_restarted_and_the_run_finishes_exactly(tmp_path, reference):
    save = str(tmp_path / "run")
    launch = torchrun(_args(save), max_restarts=2, fault="kill", at_iteration=6)
    _finished_like(save, launch, reference)


@pytest.mark.parametrize("fault", ["freeze", "stall_in_save"])
def test_a_hung_rank_is_detected_its_stack_written_and_the_run_restarted(
    tmp_path, reference, fault
):
    save = str(tmp_path / "run")
    extra = {"hang_timeout": HANG_TIMEOUT}
    if fault == "freeze":
        launch = torchrun(_args(save, **extra), max_restarts=2, fault="freeze", at_iteration=6)
    else:
        launch = torchrun(_args(save, **extra), max_restarts=2, sitecustomize=STALL_IN_SAVE,
                          tmp_path=tmp_path)  # fmt: skip
    phase = "step" if fault == "freeze" else "checkpoint save"
    hung = re.findall(r"hang: rank (\d) on \S+ \(pid \d+\) made no progress for (\d+) s in "
                      rf"{phase} after iteration (\d+)", launch.text)  # fmt: skip
    assert hung, launch.text[-4000:]
    assert all(HANG_TIMEOUT <= int(s) <= HANG_TIMEOUT + 10 for _, s, _ in hung)
    if fault == "stall_in_save":
        assert {r for r, _, _ in hung} == {"0", "1"}  # both ranks waited in the save
        assert all(it == "8" for _, _, it in hung)
    stacks = open(os.path.join(save, "stacks", "rank1.txt")).read()
    assert "most recent call first" in stacks  # faulthandler's dump of every thread
    if fault == "stall_in_save":
        assert "_stalled_save" in stacks and " recv" in stacks
    _finished_like(save, launch, reference)
    if "first_new_step" in launch.events:
        print(f"{fault}: {launch.events['first_new_step'] - launch.events.get('fault', 0):.1f} s")


def test_a_fault_that_repeats_stops_after_three_restarts(tmp_path):
    """Rank 1 dies at its first step after every start: no restart gets past the checkpoint."""
    save = str(tmp_path / "run")
    site = (
        "import os, signal\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from megatron_ext.training import step\n"
        "    _train_step = step.train_step\n"
        "    def _dying(*a, **k):\n"
        "        if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0' or _dying.n >= 5:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        _dying.n += 1\n"
        "        return _train_step(*a, **k)\n"
        "    _dying.n = 0\n"
        "    step.train_step = _dying\n"
    )
    launch = torchrun(_args(save), max_restarts=5, sitecustomize=site, tmp_path=tmp_path)
    assert launch.returncode != 0
    text = launch.text
    refusal = "error: no progress: the last 3 restarts all resumed from iteration 4"
    assert refusal in text, text[-4000:]
    # refused at the fourth restart (three ran); the rest of torchrun's budget is refused at once
    assert text.split(refusal)[0].count("resumed from iteration 4") == 4
    assert "not restarting: the attempt before stopped on purpose (exit 4" in text


def _straggler_records(save):
    records = MetricsFile.read(os.path.join(save, "metrics.jsonl")).records
    return [r for r in records if "slowest_rank" in r]


def test_a_throttled_rank_is_named_and_an_even_run_names_nobody(tmp_path):
    flags = {"log_straggler": True, "log_interval": 4}
    even_save, slow_save = str(tmp_path / "even"), str(tmp_path / "slow")
    even = torchrun(base_args(even_save, iters=24, **flags))
    assert even.returncode == 0, even.text[-3000:]
    slow = torchrun(base_args(slow_save, iters=24, **flags), fault="throttle", at_iteration=4)
    assert slow.returncode == 0, slow.text[-3000:]
    assert [r["straggler_rank"] for r in _straggler_records(even_save)] == [None] * 6
    assert "straggler:" not in even.text
    after = [r for r in _straggler_records(slow_save) if r["iteration"] > 8]  # throttled all along
    named = [r["straggler_rank"] for r in after]
    assert named.count(1) >= 0.75 * len(after), named
    line = re.search(r"straggler: rank 1 on \S+ computed [\d.]+ s per step over iterations "
                     r"\d+-\d+, \d+% slower than the median rank", slow.text)  # fmt: skip
    assert line, slow.text[-3000:]


def test_a_start_slower_than_the_hang_timeout_trains_without_a_restart(tmp_path):
    """Setup (rank 0's data build) and the first step each take longer than --hang-timeout, as
    at full C4 size: the start is timed by --hang-setup-timeout, so the run trains through,
    never declared hung or restarted; later steps keep the short timeout."""
    save = str(tmp_path / "run")
    hang_timeout = HANG_TIMEOUT
    assert SLOW_START_S > hang_timeout
    launch = torchrun(base_args(save, iters=6, hang_timeout=hang_timeout), max_restarts=1,
                      sitecustomize=SLOW_START, tmp_path=tmp_path)  # fmt: skip
    assert launch.returncode == 0, launch.text[-4000:]
    assert "hang:" not in launch.text and "resumed from iteration" not in launch.text
    line = re.search(r"hang watchdog: (\d+) s per step and phase, (\d+) s for the start",
                     launch.text)  # fmt: skip
    assert line and int(line[1]) == hang_timeout and int(line[2]) > 2 * SLOW_START_S, launch.text
    assert sorted(step_metrics(os.path.join(save, "metrics.jsonl"))["lm_loss"]) == list(range(1, 7))


def test_learned_hang_timeouts_are_kept_with_the_checkpoint(tmp_path):
    """--calc-ft-timeouts: each phase's timeout learned after a save (NVRx: 5× the longest
    seen, here raised to the floor of --hang-timeout: the tiny model's phases take far less),
    saved with the checkpoint as the watchdog's state, and used again by the resumed run."""
    import subprocess
    import sys

    import torch

    from tests.helpers import ROOT

    save = str(tmp_path / "run")
    flags = {"save_interval": 5, "hang_timeout": 30, "calc_ft_timeouts": True}

    def run(iters):
        cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"),
               *base_args(save, iters=iters, **flags)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run(10)
    # learned as each save begins: at 5 from the steps and the setup, at 10 also from the save
    learned = re.findall(r"hang timeouts learned: (.*)", first)
    assert len(learned) == 2, first[-3000:]
    values = {k: float(v) for k, v in re.findall(r"([a-z ]+?) ([\d.]+) s(?:, |$)", learned[-1])}
    assert {"step", "checkpoint save"} <= set(values) and min(values.values()) >= 30.0
    assert "setup" not in values  # the start keeps --hang-setup-timeout
    common = torch.load(os.path.join(save, "iter_0000010", "common.pt"), weights_only=False)
    section = common["run_state"]["components"]["hang_timeouts"]["current_timeouts"]["section"]
    assert {"step", "checkpoint save"} <= set(section["calculated_sections"])
    assert section["section"]["step"] == values["step"]
    second = run(12)
    assert f"hang timeouts learned by the run before: {learned[-1]}" in second
    # a resume with a process-group timeout of 18 s: learned timeouts (≥ 30 s) above its 90%
    # would let the backstop fire before the hang detector; they are capped, and saved so
    flags.update(hang_timeout=10, distributed_timeout_minutes=0.3)
    third = run(14)
    assert re.search(r"hang timeouts learned above 16 s \(90% of --distributed-timeout-minutes\) "
                     r"capped: .*step [\d.]+ s", third), third[-3000:]  # fmt: skip
    common = torch.load(os.path.join(save, "iter_0000014", "common.pt"), weights_only=False)
    section = common["run_state"]["components"]["hang_timeouts"]["current_timeouts"]["section"]
    assert max(section["section"][k] for k in section["calculated_sections"]) <= 16.2 + 1e-9
