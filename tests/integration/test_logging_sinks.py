"""W&B (offline) and TensorBoard receive what the metrics file holds, at the same steps; a
resumed run continues its W&B run unless --new-wandb-on-resume; a sink asked for but not
installed is refused before training."""

import json
import os
import subprocess
import sys

import pytest

from megatron_ext.config import ConfigError
from megatron_ext.config import run as run_config
from megatron_ext.planning.arguments import parse_run_config
from tests.helpers import ROOT
from tests.helpers.tool_commands import TINY_CPU_RUN
from tests.helpers.wandb_records import offline_runs

BASE = [*TINY_CPU_RUN, "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
        "--telemetry-interval", "2", "--lr", "3e-3", "--lr-warmup-iters", "1"]  # fmt: skip


def _train(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_MODE="offline")  # no credentials: offline
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *BASE, *flags],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(path):
    return [json.loads(x) for x in open(path)]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_scalars_and_resumes(tmp_path):
    pytest.importorskip("wandb", reason="pip install wandb (or bash run_tests.sh)")
    run = tmp_path / "run"
    flags = ["--save", str(run), "--load", str(run), "--wandb-project", "gpas-test"]
    first = _train(tmp_path, *flags, "--train-iters", "4")
    assert "wandb:" not in first.stdout + first.stderr  # W&B's own chatter is ours, once
    assert "W&B run" in first.stderr and "wandb sync" in first.stderr
    _train(tmp_path, *flags, "--train-iters", "6")
    _train(tmp_path, *flags, "--train-iters", "8", "--new-wandb-on-resume")

    runs = offline_runs(str(run))
    assert len(runs) == 3
    assert runs[0]["run_id"] == runs[1]["run_id"] != runs[2]["run_id"]
    history = {}
    for r in runs:
        history.update(r["history"])
    records = _metrics(run / "metrics.jsonl")
    steps = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, 9))
    for r in steps:
        row = history[r["iteration"]]
        assert row["lm_loss"] == pytest.approx(r["lm_loss"], rel=1e-6)
        assert row["lr"] == pytest.approx(r["lr"], rel=1e-6)
        assert row["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-6)
        for i, scale in enumerate(r["gpas_scales"]):
            assert row[f"gpas_scales/layer_{i + 1:02d}"] == pytest.approx(scale, rel=1e-6)
    for r in (r for r in records if "val_loss" in r):
        assert history[r["iteration"]]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-6)
    telemetry = [r for r in records if "telemetry" in r]
    assert [r["iteration"] for r in telemetry] == [2, 4, 6, 8]
    for r in telemetry:
        for row in r["telemetry"]:
            key = f"telemetry/layer_{row['layer'] + 1:02d}/rms_after_mlp"
            assert history[r["iteration"]][key] == pytest.approx(row["rms_after_mlp"], rel=1e-6)


@pytest.mark.slow
def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (or bash run_tests.sh)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    _train(
        tmp_path,
        "--train-iters",
        "4",
        "--tensorboard-dir",
        str(tb),
        "--metrics-file",
        str(tmp_path / "metrics.jsonl"),
    )
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    records = _metrics(tmp_path / "metrics.jsonl")

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    for tag in ("lm_loss", "lr", "grad_norm", "gpas_scales/layer_02", "gate_scale_mean"):
        key = "gpas_scales" if tag.startswith("gpas_scales") else tag
        expected = {
            r["iteration"]: (r[key][1] if key == "gpas_scales" else r[key])
            for r in records
            if key in r
        }
        assert scalars(tag) == pytest.approx(expected, rel=1e-6), tag
    assert scalars("val_loss") == pytest.approx(
        {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}, rel=1e-6
    )
    rms = scalars("telemetry/layer_01/rms_after_attn")
    assert sorted(rms) == [2, 4]


@pytest.mark.parametrize(
    "flag, package", [("--wandb-project", "wandb"), ("--tensorboard-dir", "tensorboard")]
)
def test_a_sink_that_is_not_installed_is_refused_at_start(monkeypatch, flag, package):
    cfg = parse_run_config([*BASE, "--train-iters", "4", flag, "x"])
    monkeypatch.setattr(run_config, "_installed", lambda name: name != package)
    with pytest.raises(ConfigError, match=f"{flag}.*pip install {package}"):
        cfg.validate(1)
