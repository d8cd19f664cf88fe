"""A normal run prints only our lines: no third-party warnings from pretrain_gpas.py or the
tools; --verbose (or PYTHONWARNINGS) brings them back."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers.tool_commands import TINY_CPU_RUN

TE_NOTICE = "Transformer Engine and Apex are not installed"


def _run(argv, tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *argv], cwd=str(tmp_path), env=full_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_training_output_is_ours_unless_verbose(tmp_path):
    flags = ["--train-iters", "2", "--log-interval", "1", "--eval-iters", "0"]
    argv = [os.path.join(ROOT, "pretrain_gpas.py"), *TINY_CPU_RUN, *flags, "--save", "run"]
    quiet = _run(argv, tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    assert "Warning" not in text and "warnings.warn" not in text, text
    lines = [x for x in text.splitlines() if x.strip()]
    # every line is one of ours: a timestamped log line
    assert all(x[:2].isdigit() and x[2] == ":" for x in lines), lines
    for extra in (["--verbose"], []):
        env = {} if extra else {"PYTHONWARNINGS": "default"}
        loud = _run([*argv[:-1], f"run{len(extra)}", *extra], tmp_path, **env)
        assert loud.returncode == 0, loud.stderr[-3000:]
        assert TE_NOTICE in loud.stderr


def test_tools_print_no_third_party_warnings(tmp_path):
    tools = ["convert_to_hf.py", "preprocess_data.py", "run_grid.py", "depth_analysis.py"]
    tools += ["grid_table.py", "train_tokenizer.py", "plot_run.py", "convert_from_hf.py"]
    for tool in tools:
        proc = _run([os.path.join(ROOT, "tools", tool), "--help"], tmp_path)
        assert proc.returncode == 0, (tool, proc.stderr)
        assert "Warning" not in proc.stderr, (tool, proc.stderr)
