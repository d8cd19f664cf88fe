"""The README's first command as a newcomer meets it: a copy of the project, an empty virtual
environment made with the machine's own Python, and `bash examples/quickstart/run.sh` at tiny
size with PYTHON pointing into that environment. The script must install what it needs itself,
print nothing that looks like a failure, and end with its summary."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers.newcomer import copy_project, empty_venv, failure_lines, newcomer_env


@pytest.mark.slow
@pytest.mark.exclusive
def test_first_command_in_an_empty_venv(tmp_path):
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    copy_project(str(clone))
    python = empty_venv(venv)
    out = tmp_path / "qs"
    env = newcomer_env(
        PYTHON=python, OUT=str(out), ITERS="6", LAYERS="2", HIDDEN="64", SEQ="32",
        VOCAB="512", DEPTH="1", DEVICE="cpu",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "examples/quickstart/run.sh"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert not failure_lines(text), "\n".join(failure_lines(text)) + "\n" + text[-3000:]
    versions = r"^ready: torch 2\.\S+, megatron-core 0\.16\.1, device cpu$"
    assert re.search(versions, proc.stdout, re.M), proc.stdout[:2000]

    assert os.path.getsize(out / "comparison.png") > 10_000
    assert os.path.getsize(out / "depth" / "depth.png") > 10_000
    assert os.path.isfile(out / "tokenizer" / "spm.model")
    finals = {}
    for norm in ("pre", "pre_gpas"):
        cell = out / "grid" / "cells" / "2x64" / norm / "seed1"
        records = [json.loads(x) for x in open(cell / "metrics.jsonl")]
        assert [r["iteration"] for r in records if "lm_loss" in r] == list(range(1, 7))
        finals[norm] = [r for r in records if "val_loss" in r][-1]
        assert finals[norm]["iteration"] == 6
        assert (cell / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "6"
        # the summary line reports the run's own final validation
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(f"{norm}:"))
        assert f"validation loss {finals[norm]['val_loss']:.4f}" in line
    gap = finals["pre_gpas"]["val_loss"] - finals["pre"]["val_loss"]
    assert f"pre_gpas − pre = {gap:+.4f} in loss" in proc.stdout
    assert "GPAS scales c = 1 − SiLU(g)" in proc.stdout
    assert proc.stdout.count("    depth: ") == 2
    assert re.search(r"elapsed: \d+m\d\ds", proc.stdout)

    # the install put the commands on the venv's PATH; they run from any directory
    help_ = subprocess.run(
        [str(venv / "bin" / "gpas-pretrain"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert help_.returncode == 0 and help_.stdout.startswith("usage: gpas-pretrain"), help_.stderr


def test_failure_lines_are_recognised():
    text = (
        "ready: torch 2.13.0\nSyntaxError: f-string\n"
        "WARNING: Location 'file:///x' is ignored: it is neither a file nor a directory.\n"
        "UserWarning: x\n"
    )
    assert failure_lines(text) == ["SyntaxError: f-string", "UserWarning: x"]


def _plot_run(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_plot_run_names_a_cut_line_and_rejects_a_file_without_records(tmp_path):
    cut = tmp_path / "m.jsonl"  # a run killed mid-line, then resumed
    cut.write_text('{"iteration": 1, "lm_loss": 2.0}\n{"iteration": 2, "lm_\n'
                   '{"iteration": 2, "lm_loss": 1.5}\n')  # fmt: skip
    proc = _plot_run(cut, "--out", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    assert f"note: {cut}:2: skipped 1 line(s)" in proc.stderr
    assert "2 logged steps" in proc.stdout and (tmp_path / "p.png").is_file()
    bad = tmp_path / "notes.txt"
    bad.write_text("not json\n")
    proc = _plot_run(bad, "--out", tmp_path / "q.png")
    assert proc.returncode == 2 and f"error: {bad} holds no metrics records" in proc.stderr
