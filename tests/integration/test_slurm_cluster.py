"""The SLURM launch files on a real (local, two-node) Slurm cluster, in CPU mode.

* examples/slurm/train.sbatch trains a tiny model across 2 nodes (one task each) and
  checkpoints;
* the same job, signalled as Slurm does before a time limit, saves, requeues itself and resumes
  to the same final loss as the uninterrupted run;
* a task killed mid-run: the script starts the step again inside the allocation, which resumes
  to the same final loss; a bad input is not restarted;
* examples/slurm/preprocess_array.sbatch (array + dependent merge) writes the same dataset as
  one tools/preprocess_data.py process.
"""

import filecmp
import json
import os
import subprocess
import sys
import time

import pytest

from bench.fault_drills import process_with_env
from tests.helpers import ROOT
from tests.helpers.slurm_cluster import TERMINAL_STATES, LocalSlurmCluster, why_unavailable
from tests.helpers.tool_commands import grid_command, preprocess_command

TRAIN = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
PREPROCESS = os.path.join(ROOT, "examples", "slurm", "preprocess_array.sbatch")
ITERS = 150

_reason = why_unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.exclusive,
    pytest.mark.skipif(_reason is not None, reason=str(_reason)),
]

# CPU mode: no GPUs on these nodes, one task per node, one CPU per task.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
RECIPE = os.path.join(ROOT, "examples", "slurm", "recipes", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def recipe():
    return RECIPE


def _submit_training(cluster, recipe, run_dir, extra=()):
    env = {"RECIPE": recipe, "RUN": str(run_dir), "DEVICE": "cpu", "PYTHON": sys.executable}
    return cluster.sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            *CPU_JOB,
            f"--output={run_dir}/slurm-%j.out",
            TRAIN,
            "--train-iters",
            str(ITERS),
            *extra,
        ],
        env=env,
        cwd=ROOT,
    )


def _wait_for_log(cluster, job, log, text, timeout):
    """Until ``text`` is in the job's log; fails after ``timeout`` seconds with the log's tail."""
    deadline = time.time() + timeout
    while text not in _read(log):
        assert time.time() < deadline, (
            f"job {job} ({cluster.job_field(job, 'JobState')}) not training\n{_read(log)[-3000:]}"
        )
        time.sleep(0.2)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _final_loss(run_dir):
    rows = [r for r in _metrics(run_dir) if r.get("iteration") == ITERS and "lm_loss" in r]
    assert rows, f"no metrics row for iteration {ITERS} in {run_dir}"
    return rows[-1]["lm_loss"]


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


@pytest.fixture(scope="module")
def uninterrupted_run(cluster, recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job = _submit_training(cluster, recipe, run_dir, ["--save-interval", "50"])
    state = cluster.wait(job, timeout=300)
    log = _read(os.path.join(run_dir, "logs", f"train-{job}-restart0.log"))
    assert state == "COMPLETED", f"job {job}: {state}\n{log[-3000:]}"
    return job, run_dir, log


def test_launcher_trains_across_two_nodes_and_checkpoints(cluster, uninterrupted_run):
    job, run_dir, log = uninterrupted_run
    assert cluster.job_field(job, "NumNodes") == "2"
    assert cluster.job_field(job, "NodeList") == "gpastest[1-2]"
    header = _read(os.path.join(run_dir, f"slurm-{job}.out"))
    assert "2 nodes x 1 tasks, master gpastest1:" in header
    assert "layout: TP=1 PP=1 DP=2" in log  # the two tasks formed one data-parallel group
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("iter_")) == [
        "iter_0000050",
        "iter_0000100",
        "iter_0000150",
    ]
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    losses = [r["lm_loss"] for r in _metrics(run_dir) if "lm_loss" in r]
    assert len(losses) == ITERS and losses[-1] < losses[0] - 1.0


def test_preempted_job_requeues_and_ends_with_the_same_loss(
    cluster, recipe, uninterrupted_run, tmp_path
):
    _, reference_dir, _ = uninterrupted_run
    run_dir = tmp_path / "preempted"
    run_dir.mkdir()
    job = _submit_training(cluster, recipe, run_dir, ["--save-interval", "1000"])
    first_log = os.path.join(run_dir, "logs", f"train-{job}-restart0.log")
    _wait_for_log(cluster, job, first_log, "iter       5/", 120)  # training is under way
    cluster.signal_batch_script(job, "USR1")

    # The trainer saves and exits, the script requeues: the job is pending again, held back
    # by Slurm's requeue delay, which the test skips.
    deadline = time.time() + 120
    while cluster.job_field(job, "Restarts") != "1" or cluster.job_field(job, "JobState") not in (
        {"RUNNING"} | TERMINAL_STATES
    ):
        assert time.time() < deadline, f"job {job} was not requeued\n{_read(first_log)[-3000:]}"
        if cluster.job_field(job, "Reason") == "BeginTime":
            cluster.release(job)
        time.sleep(0.5)
    state = cluster.wait(job, timeout=300)
    second_log = _read(os.path.join(run_dir, "logs", f"train-{job}-restart1.log"))
    assert state == "COMPLETED", f"job {job}: {state}\n{second_log[-3000:]}"

    header = _read(os.path.join(run_dir, f"slurm-{job}.out"))
    assert "USR1 received, asking the trainer to save" in header
    assert "after saving; requeueing" in header
    saved = [d for d in os.listdir(run_dir / "checkpoints") if d.startswith("iter_")]
    interrupted_at = min(int(d.split("_")[1]) for d in saved)
    assert 5 <= interrupted_at < ITERS  # saved mid-run because of the signal
    assert f"resumed from iteration {interrupted_at}" in second_log
    assert _final_loss(run_dir) == _final_loss(reference_dir)


def test_a_killed_task_restarts_the_step_and_the_job_finishes(
    cluster, recipe, uninterrupted_run, tmp_path
):
    _, reference_dir, _ = uninterrupted_run
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    job = _submit_training(cluster, recipe, run_dir, ["--save-interval", "50"])
    first_log = os.path.join(run_dir, "logs", f"train-{job}-restart0.log")
    _wait_for_log(cluster, job, first_log, "iter      60/", 180)  # past the first checkpoint
    os.kill(process_with_env(SLURM_JOB_ID=job, SLURM_PROCID=1), 9)  # the second node's task
    state = cluster.wait(job, timeout=300)
    second_log = _read(os.path.join(run_dir, "logs", f"train-{job}-restart0-step1.log"))
    assert state == "COMPLETED", f"job {job}: {state}\n{second_log[-3000:]}"
    header = _read(os.path.join(run_dir, f"slurm-{job}.out"))
    assert "the step failed (exit" in header and "starting it again (1 of 3)" in header
    assert cluster.job_field(job, "Restarts") == "0"  # inside the allocation, no requeue
    assert "resumed from iteration 50" in second_log
    assert _final_loss(run_dir) == _final_loss(reference_dir)


def test_a_bad_input_is_not_restarted(cluster, recipe, tmp_path):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    job = _submit_training(cluster, recipe, run_dir, ["--data-path", str(tmp_path / "none")])
    state = cluster.wait(job, timeout=300)
    header = _read(os.path.join(run_dir, f"slurm-{job}.out"))
    assert state == "FAILED", header
    assert "the trainer stopped on purpose (exit 2); not restarting" in header
    assert "starting it again" not in header and cluster.job_field(job, "Restarts") == "0"


def test_preprocessing_array_job_equals_one_process(
    cluster, english_docs, hf_tokenizer_dir, tmp_path
):
    inputs = tmp_path / "input"
    inputs.mkdir()
    for i in range(4):  # four input shards, spread over two array tasks
        with open(inputs / f"part-{i}.jsonl", "w") as f:
            for doc in english_docs[i::4]:
                f.write(json.dumps({"text": doc}) + "\n")
    glob = str(inputs / "part-*.jsonl")
    env = {
        "INPUT": glob,
        "TOKENIZER": hf_tokenizer_dir,
        "TOKENIZER_TYPE": "HuggingFaceTokenizer",
        "OUT": str(tmp_path / "array" / "c4"),
        "TASKS": "2",
        "PYTHON": sys.executable,
        "SBATCH_ARGS": f"--cpus-per-task=1 --time=15 --output={tmp_path}/slurm-%A_%a.out",
    }
    submit = subprocess.run(
        ["bash", PREPROCESS],
        env={**cluster.env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    merge_job = submit.stdout.strip().splitlines()[-1]
    state = cluster.wait(merge_job, timeout=300)
    logs = "".join(_read(str(p)) for p in tmp_path.glob("slurm-*.out"))
    assert state == "COMPLETED", f"merge job {merge_job}: {state}\n{logs[-3000:]}"

    single = tmp_path / "single" / "c4"
    command = preprocess_command(glob, "HuggingFaceTokenizer", hf_tokenizer_dir, "--append-eod")
    subprocess.run(
        [*command, "--output-prefix", str(single), "--workers", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for suffix in ("_text_document.bin", "_text_document.idx"):
        array_file = str(tmp_path / "array" / "c4") + suffix
        single_file = str(single) + suffix
        assert os.path.getsize(single_file) > 0
        assert filecmp.cmp(array_file, single_file, shallow=False), suffix


def _wait_for_array(cluster, job_id: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id], env=cluster.env, capture_output=True, text=True
        ).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"array job {job_id} still queued or running after {timeout:.0f} s")


def test_grid_as_an_array_job_runs_each_cell_through_the_launcher(cluster, tmp_path):
    from megatron_ext.grid.spec import GridSpec
    from megatron_ext.grid.status import FINISHED, cell_state

    out = tmp_path / "grid"
    shared = [
        "--mock-data",
        "--vocab-size",
        "512",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--train-iters",
        "6",
        "--eval-interval",
        "6",
        "--eval-iters",
        "1",
        "--num-workers",
        "0",
    ]
    subprocess.run(
        grid_command("slurm", out, ["pre", "pre_gpas"], [1], "--device", "cpu", "--", *shared),
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    script = str(out / "grid.sbatch")
    job_args = ["--nodes=1", "--ntasks-per-node=1", *CPU_JOB, script]
    _wait_for_array(cluster, cluster.sbatch(job_args, env={"PYTHON": sys.executable}, cwd=ROOT))
    spec = GridSpec.load(str(out))
    spec.validate()
    logs = "".join(_read(str(p)) for p in (out / "slurm").glob("*.out"))
    for cell in spec.cells():
        assert cell_state(cell, 6).state == FINISHED, logs[-3000:]
        # launched by examples/slurm/train.sbatch: its per-job log under the cell
        assert any(n.startswith("train-") for n in os.listdir(cell.logs)), cell.name

    # Submitting the same script again runs nothing: every task sees its cell finished.
    _wait_for_array(cluster, cluster.sbatch(job_args, env={"PYTHON": sys.executable}, cwd=ROOT))
    logs = "".join(_read(str(p)) for p in (out / "slurm").glob("*.out"))
    assert logs.count("already finished") == 2, logs[-3000:]
