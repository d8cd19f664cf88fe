"""Training runs through the command line, as the integration tests start them: the tiny
model's flags, a spawned process, and the per-step records of its metrics file."""

import json
import os
import subprocess
import sys

from bench.fault_drills import tiny_run_args as base_args  # noqa: F401 - the tests' tiny run
from tests.helpers import ROOT


def losses(metrics_path):
    return step_metrics(metrics_path)["lm_loss"]


STEP_KEYS = ("lm_loss", "grad_norm", "gate_grad_norm")


def step_metrics(metrics_path) -> dict:
    """{key: {iteration: value}} of the per-step loss, gradient norm and gate gradient norm."""
    out = {k: {} for k in STEP_KEYS}
    for line in open(metrics_path):
        r = json.loads(line)
        if "lm_loss" in r:
            for k in STEP_KEYS:
                out[k][r["iteration"]] = r[k]
    return out


def spawn(args, **kw):
    """pretrain_gpas.py in its own process group (so a test can signal it and its children)."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=ROOT,
        **kw,
    )
