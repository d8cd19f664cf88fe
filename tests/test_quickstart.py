"""The README's quickstart, at tiny size: real text and tokenizer from installed packages,
preprocessing, a pre_gpas and a pre run, evaluation and the comparison plot."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, OUT=str(out), ITERS="6", MODEL="tiny", SEQ="32", DEVICE="cpu")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "quickstart", "run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.getsize(out / "comparison.png") > 10_000
    for norm in ("pre", "pre_gpas"):
        records = [json.loads(x) for x in open(out / norm / "metrics.jsonl")]
        assert [r["iteration"] for r in records if "lm_loss" in r] == list(range(1, 7))
        assert any("val_loss" in r for r in records)
        assert (out / norm / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert "final validation loss" in proc.stdout


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
