"""The README's quickstart at tiny size: installs nothing when everything is there, writes the
corpus, trains its tokenizer, preprocesses, trains pre and pre_gpas side by side through the
grid runner, and prints the summary, the depth analysis and the elapsed time, with no
third-party warnings on the way."""

import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(
        os.environ,
        OUT=str(out),
        ITERS="6",
        LAYERS="2",
        HIDDEN="64",
        SEQ="32",
        VOCAB="512",
        DEPTH="1",
        DEVICE="cpu",
    )
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "quickstart", "run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert "Warning" not in text and "warnings.warn" not in text, text[-5000:]
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


def test_plot_run_rejects_bad_input(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"iteration": 1, "lm_loss": 2.0}\nnot json\n')
    proc = subprocess.run(
        [
            "python",
            os.path.join(ROOT, "tools", "plot_run.py"),
            str(bad),
            "--out",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr
