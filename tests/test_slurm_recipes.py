"""The SLURM launch files: shell syntax, and every recipe plans a valid run at its node size."""

import os
import subprocess

import pytest

from megatron_ext.training.arguments import parse_run_config
from megatron_ext.training.planning import plan_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert plan.world_size == RECIPES[name]
    if name.startswith("7b"):
        assert (cfg.optim.clip_grad, cfg.optim.clip_gate_grad, cfg.optim.lr) == (1.0, 0.01, 3e-4)
        assert cfg.optim.recompute_granularity == "full"
