"""The README's command for the second stage as a newcomer meets it: `bash examples/sft/run.sh`
in a copy of the project, with an empty virtual environment and the script's own default (relative)
output directory, at tiny size: pretrain → SFT with LISA and frozen gates → export → the
downstream table. It installs what it needs, prints nothing that looks like a failure, and the
GPAS export after SFT matches our model."""

import csv
import json
import re
import subprocess

import pytest

from tests.helpers.newcomer import copy_project, empty_venv, failure_lines, newcomer_env

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]
pytest.importorskip("lm_eval", reason="pip install lm-eval accelerate (or bash run_tests.sh)")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_recipe")
    clone = root / "clone"
    copy_project(str(clone))
    python = empty_venv(root / "venv")
    env = newcomer_env(PYTHON=python, ITERS="30", RECORDS="120", HF_DATASETS_OFFLINE="1",
                       HF_HUB_OFFLINE="1")  # fmt: skip
    proc = subprocess.run(["bash", "examples/sft/run.sh"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not failure_lines(text), "\n".join(failure_lines(text)) + "\n" + text[-3000:]
    return clone / "runs" / "sft", proc.stdout


def test_the_recipe_prints_sft_losses_and_writes_the_table(recipe):
    out, stdout = recipe
    for norm in ("pre", "pre_gpas"):
        line = next(x for x in stdout.splitlines() if x.startswith(f"{norm}: SFT training loss"))
        first, last = map(float, re.findall(r"loss (\d+\.\d+)", line)[:2])
        assert first > last  # fine-tuning lowered the loss on its own data
    assert "froze 4 GPAS gates" in stdout  # pre_gpas only: pre has none
    rows = list(csv.DictReader(open(out / "downstream" / "downstream.csv")))
    models = {r["model"] for r in rows}
    assert models == {"pre", "pre_gpas"}
    task = [r for r in rows if r["task"] == "sft_local_mc"]
    assert len(task) == 2 and all(0.0 <= float(r["acc"]) <= 1.0 for r in task)
    results = json.loads(
        open(next((out / "downstream" / "raw" / "pre_gpas").rglob("results_*.json"))).read()
    )
    assert results["results"]["sft_local_mc"]["acc,none"] == pytest.approx(
        float(next(r["acc"] for r in task if r["model"] == "pre_gpas"))
    )
    table = open(out / "downstream" / "downstream.md").read()
    assert "| sft_local_mc |" in table and "**average (acc)**" in table
    assert re.match(r"lm-evaluation-harness 0\.4\.\d+, 0-shot\n", table), table[:200]
    assert re.search(r"^elapsed: \d+s$", stdout, re.M)


def test_the_gpas_export_after_sft_matches_our_model(recipe):
    from megatron_ext.export.verify import verify_export

    out, _ = recipe
    report = verify_export(
        str(out / "pre_gpas" / "sft"), str(out / "downstream" / "exports" / "pre_gpas")
    )
    assert report.max_abs_diff <= 1e-4, report.summary()  # the export tests' standard
