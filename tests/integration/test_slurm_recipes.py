"""The SLURM launch files: shell syntax, and every recipe plans a valid run at its node size."""

import os
import subprocess
import sys

import pytest

from megatron_ext.planning.arguments import parse_run_config
from megatron_ext.planning.plan import plan_run
from tests.helpers import ROOT

SLURM = os.path.join(ROOT, "examples", "slurm")
# recipe → the GPU count it is written for (one GPU, one 8-GPU node, 8 nodes)
RECIPES = {"71m": 1, "130m": 1, "250m": 8, "350m": 8, "1b": 8, "7b_pre": 64, "7b_pre_gpas": 64}
REFERENCE_TOKEN_SLOTS = {  # spec §5
    "71m": 1.31e9,
    "130m": 2.62e9,
    "250m": 5.24e9,
    "350m": 7.86e9,
    "1b": 13.1e9,
    "7b_pre": 78.6e9,
    "7b_pre_gpas": 78.6e9,
}


@pytest.mark.parametrize("script", ["train.sbatch", "preprocess_array.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(SLURM, script)], check=True)


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_plans_the_reference_run(name, tmp_path):
    recipe = os.path.join(SLURM, "recipes", f"{name}.yaml")
    cfg = parse_run_config(["--config", recipe, "--mock-data", "--save", str(tmp_path)])
    plan = plan_run(cfg, RECIPES[name])
    slots = cfg.optim.train_iters * cfg.global_batch_size(RECIPES[name]) * cfg.model.seq_length
    assert abs(slots / REFERENCE_TOKEN_SLOTS[name] - 1) < 0.01
    # the layout fills the node count it is written for, and the batch splits evenly over it
    assert plan.tp * plan.pp * plan.dp == RECIPES[name]
    assert plan.global_batch == plan.num_microbatches * cfg.optim.micro_batch_size * plan.dp
    # and it fits an 80 GB GPU: weights, optimizer state and activations of one micro-batch
    assert plan.weights_and_optimizer_gib + plan.activations_gib < 80
    if name.startswith("7b"):
        assert (cfg.optim.clip_grad, cfg.optim.clip_gate_grad, cfg.optim.lr) == (1.0, 0.01, 3e-4)
        assert cfg.optim.recompute_granularity == "full"


def _torchrun_recipe(recipe, save, *extra):
    import sys

    from megatron_ext.platform.distributed import free_port

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            os.path.join(ROOT, "pretrain_gpas.py"),
            "--config",
            recipe,
            "--device",
            "cpu",
            "--model-size",
            "tiny4",
            "--mock-data",
            "--vocab-size",
            "512",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            "4",
            "--lr-warmup-iters",
            "1",
            "--eval-iters",
            "0",
            "--save-interval",
            "4",
            "--save",
            str(save),
            "--load",
            str(save),
            "--log-interval",
            "1",
            "--num-workers",
            "0",
            *extra,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def _step_lines(save):
    import json

    return [
        {k: r[k] for k in ("iteration", "lm_loss", "grad_norm", "gate_grad_norm")}
        for r in map(json.loads, open(save / "metrics.jsonl"))
        if "lm_loss" in r
    ]


@pytest.mark.slow
@pytest.mark.exclusive
def test_7b_recipe_flags_train_checkpoint_resume_and_export_at_tiny_shape(tmp_path):
    """The 7B recipe's flags exactly (bf16, TP 2 + sequence parallelism, distributed optimizer
    with overlapped reductions, full recompute, both clips) at a tiny shape on 2 CPU ranks:
    an interrupted run resumes to the same per-step metrics, and its checkpoint exports to
    Hugging Face and passes the export's verification."""
    import sys

    recipe = os.path.join(SLURM, "recipes", "7b_pre_gpas.yaml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _torchrun_recipe(recipe, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout: TP=2 PP=1 DP=1" in proc.stderr
    assert "iter       4/4" in proc.stderr
    assert (straight / "iter_0000004").is_dir()
    first = _torchrun_recipe(recipe, split, "--exit-interval", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (split / "iter_0000002").is_dir()
    resumed = _torchrun_recipe(recipe, split)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from iteration 2" in resumed.stderr
    assert _step_lines(split) == _step_lines(straight)
    assert [r["iteration"] for r in _step_lines(split)] == [1, 2, 3, 4]
    exported = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_to_hf.py"),
            "--load",
            str(split),
            "--output",
            str(tmp_path / "hf"),
            "--verify",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verify passed" in exported.stderr


def test_the_sft_recipe_plans_the_papers_second_stage(tmp_path):
    recipe = os.path.join(SLURM, "recipes", "sft_1b.yaml")
    cfg = parse_run_config(["--config", recipe, "--mock-data", "--save", str(tmp_path)])
    assert cfg.sft.sft and cfg.gates_frozen
    assert (cfg.sft.epochs, cfg.optim.lr, cfg.sft.lisa_layers, cfg.sft.lisa_interval) == (
        4, 3e-4, 4, 3,
    )  # fmt: skip
    o = cfg.optim
    assert (cfg.model.seq_length, o.seed, o.clip_grad, o.lr_warmup_iters, o.weight_decay) == (
        512, 42, 1.0, 0, 0.0,
    )  # fmt: skip
    adam = (o.adam_beta1, o.adam_beta2, o.adam_eps, o.lr_decay_style)
    assert adam == (0.9, 0.999, 1e-8, "linear")
    plan = plan_run(cfg, 8)
    assert (plan.dp, plan.global_batch, plan.num_microbatches) == (8, 16, 1)  # one node: 2 × 8
    lisa = plan.lines()[-1]
    assert lisa.startswith("LISA: 4 of 24 layers train at a time") and "allocated for all" in lisa


def test_the_sft_pipeline_submits_data_then_sft_then_the_table(tmp_path):
    script = os.path.join(ROOT, "examples", "sft", "slurm", "pipeline.sh")
    subprocess.run(["bash", "-n", script], check=True)
    env = dict(os.environ, DRY_RUN="1", CS170K="cs.json", TOKENIZER="t.model", OUT=str(tmp_path))
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True)
    jobs = [x for x in proc.stderr.splitlines() if x.startswith("sbatch ")]
    assert len(jobs) == 4
    assert "tools/preprocess_sft.py" in jobs[0] and "--loss-on-prompt" in jobs[0]
    assert "--pack --seq-length 512" in jobs[0] and "--template llm-adapters" in jobs[0]
    for job, norm in zip(jobs[1:3], ("pre", "pre_gpas"), strict=True):
        assert "--dependency=afterok:" in job and f"--norm-type {norm}" in job
        assert f"--pretrained-checkpoint runs/1b_{norm}/checkpoints" in job
    assert "tools/downstream_eval.py" in jobs[3] and jobs[3].count("--model ") == 2


def _stand_in_slurm(tmp_path, srun: str):
    """A folder holding an ``srun`` script and an ``scontrol`` that names one node, to put first
    on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(srun)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    return bin_dir


_FAKE_SRUN = """#!/bin/bash
# Stands in for srun with two tasks where task 1 stops on its own and task 0 is killed by
# --kill-on-bad-exit before it exits: the step's status is the killed task's 143.
while [[ $1 == --* ]]; do
    [[ $1 == --output=* ]] && log=${1#--output=}
    shift
done
SLURM_PROCID=1 SLURM_LOCALID=0 SLURM_NTASKS=2 "$@" >>"$log" 2>&1
echo "fake srun: task 1 exited $?, task 0 terminated" >>"$log"
exit 143
"""


@pytest.mark.parametrize("flag", ["--data-path", "--data-pth"])  # no data; a misspelled flag
def test_a_deliberate_stop_of_one_task_is_not_restarted_when_srun_reports_a_killed_peer(
    tmp_path, flag
):
    """srun's status is its worst task's: a peer killed after one rank's exit 2 reads as 143, a
    failure that the script would restart. Each task's own exit code decides instead."""
    bin_dir = _stand_in_slurm(tmp_path, _FAKE_SRUN)
    run = tmp_path / "run"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RECIPE=os.path.join(SLURM, "recipes", "tiny_cpu.yaml"),
        RUN=str(run),
        DEVICE="cpu",
        PYTHON=sys.executable,
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="node1",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=ROOT,
    )
    proc = subprocess.run(
        ["bash", os.path.join(SLURM, "train.sbatch"), flag, str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (run / "logs" / "train-7-restart0.log").read_text()
    assert proc.returncode == 2, proc.stderr + log
    assert "task 1 exited 2, task 0 terminated" in log
    assert "the trainer stopped on purpose (exit 2); not restarting" in proc.stderr
    assert "starting it again" not in proc.stderr
    assert (run / "logs" / "train-7-restart0.exits" / "rank1").read_text() == "2\n"


_DATA_STEP_SRUN = """#!/bin/bash
# Stands in for srun: runs the one-task data step; records the training step and ends it.
args=("$@")
while [[ $1 == --* ]]; do
    [[ $1 == --output=* ]] && log=${1#--output=}
    [[ $1 == --ntasks=1 ]] && one=1
    shift
done
if [[ -n $one ]]; then
    "$@" >>"$log" 2>&1
else
    echo "training step: ${args[*]}" >>"$log"
fi
"""


@pytest.mark.parametrize("data", ["real", "missing"])
def test_the_job_prepares_the_data_in_one_task_before_training(tmp_path, mistral_model, data):
    """With DATA, train.sbatch's first step is one task of ``--prepare-data-only`` with the
    training flags: it builds the packed index cache, then the training step runs; data that
    cannot be read ends the job with that exit code before any training step."""
    import numpy as np

    from megatron_ext.data.indexed_writer import IndexedDatasetWriter

    prefix = str(tmp_path / "data" / "c4_text_document")
    if data == "real":
        rng = np.random.default_rng(0)
        lengths = rng.integers(20, 200, size=2000).astype(np.int32)
        writer = IndexedDatasetWriter(prefix, np.uint16)
        writer.add_documents(rng.integers(3, 30000, int(lengths.sum())).astype(np.uint16), lengths)
        writer.finalize()
    bin_dir = _stand_in_slurm(tmp_path, _DATA_STEP_SRUN)
    run = tmp_path / "run"
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RECIPE=os.path.join(SLURM, "recipes", "tiny_cpu.yaml"), RUN=str(run), DEVICE="cpu",
        PYTHON=sys.executable, DATA=prefix, TOKENIZER=mistral_model, SLURM_JOB_ID="9",
        SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=ROOT,
    )  # fmt: skip
    proc = subprocess.run(["bash", os.path.join(SLURM, "train.sbatch")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    prepared = (run / "logs" / "prepare-data-9.log").read_text()
    training = run / "logs" / "train-9-restart0.log"
    if data == "missing":
        assert proc.returncode == 2, proc.stderr + prepared
        assert "error: --data-path" in prepared and "preparing the data failed" in proc.stderr
        assert not training.exists()
        return
    assert proc.returncode == 0, proc.stderr + prepared
    assert "data: no cached train index" in prepared and "data: train index ready" in prepared
    assert os.listdir(os.path.join(prefix, "cache", "GPTDataset_indices"))  # megatron-core's place
    assert "training step:" in training.read_text()
