"""The grid runner, its table and its Slurm array.

Runner logic (skip finished, retry failed, a failure does not stop the grid) is tested against a
stand-in trainer; the table against results written by the test with known values; and a tiny
real grid end to end (2 norm types × 2 seeds, interrupted by a signal and resumed, table built).
"""

import csv
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_ext.config import ConfigError
from megatron_ext.grid import table
from megatron_ext.grid.runner import LocalGridRunner
from megatron_ext.grid.spec import GridSpec, size_flags
from megatron_ext.grid.status import FAILED, FINISHED, INTERRUPTED, PENDING, cell_state
from megatron_ext.variants import NORM_TYPE_NAMES
from tests.helpers import ROOT
from tests.helpers.tool_commands import grid_command

RUN_GRID = os.path.join(ROOT, "tools", "run_grid.py")
GRID_TABLE = os.path.join(ROOT, "tools", "grid_table.py")
SHARED = ["--mock-data", "--device", "cpu", "--micro-batch-size", "2", "--global-batch-size", "2"]


def _spec(tmp_path, norms=("pre", "pre_gpas"), seeds=(1, 2), iters=4, sizes=("tiny",)):
    spec = GridSpec(
        out=str(tmp_path / "grid"),
        sizes=list(sizes),
        norm_types=list(norms),
        seeds=list(seeds),
        train_args=[*SHARED, "--train-iters", str(iters)],
    )
    spec.validate()
    return spec


# -- the grid's definition -------------------------------------------------------------------
def test_size_flags_presets_and_shapes():
    assert size_flags("71m") == {"model-size": "71m"}
    # Llama's FFN: 8/3 · hidden rounded up to 32; heads of 32 channels unless given.
    assert size_flags("12x128") == {
        "num-layers": 12,
        "hidden-size": 128,
        "num-attention-heads": 4,
        "ffn-hidden-size": 352,
    }
    assert size_flags("8x96x2")["num-attention-heads"] == 2
    assert size_flags("8x96x2")["ffn-hidden-size"] == 256
    with pytest.raises(ConfigError, match="--sizes.*12by128"):
        size_flags("12by128")
    with pytest.raises(ConfigError, match="not divisible"):
        size_flags("4x100x3")


def test_spec_validation_names_the_problem(tmp_path):
    spec = _spec(tmp_path, norms=["all"], seeds=[3])
    assert spec.norm_types == list(NORM_TYPE_NAMES) and spec.train_iters == 4
    with pytest.raises(ConfigError, match="unknown prenorm"):
        _spec(tmp_path, norms=["pre", "prenorm"])
    with pytest.raises(ConfigError, match="--seed is set by the grid"):
        GridSpec(str(tmp_path), ["tiny"], ["pre"], [1], ["--seed", "3"]).validate()
    with pytest.raises(ConfigError, match="listed twice"):
        GridSpec(str(tmp_path), ["tiny", "tiny"], ["pre"], [1], []).validate()
    with pytest.raises(ConfigError, match="do not parse"):
        GridSpec(str(tmp_path), ["tiny"], ["pre"], [1], ["--no-such-flag"]).validate()


def test_cells_are_ordered_by_size_then_seed_and_saved(tmp_path):
    spec = _spec(tmp_path, sizes=("tiny", "2x64"))
    names = [c.name for c in spec.cells()]
    assert names[:4] == [
        "tiny/pre/seed1",
        "tiny/pre_gpas/seed1",
        "tiny/pre/seed2",
        "tiny/pre_gpas/seed2",
    ]
    assert len(set(c.directory for c in spec.cells())) == 8
    spec.save()
    again = GridSpec.load(spec.out)
    assert again.same_grid(spec) and again.cells() == spec.cells()


def test_run_grid_refuses_another_grid_in_the_same_directory(tmp_path):
    out = str(tmp_path / "grid")
    _spec(tmp_path).save()
    proc = subprocess.run(
        [
            sys.executable,
            RUN_GRID,
            "status",
            "--out",
            out,
            "--sizes",
            "tiny",
            "--seeds",
            "9",
            "--",
            *SHARED,
            "--train-iters",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "holds another grid" in proc.stderr


# -- the runner, with a stand-in trainer -----------------------------------------------------
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys, yaml
    argv = sys.argv[1:]
    recipe = yaml.safe_load(open(argv[argv.index("--config") + 1]))
    save = argv[argv.index("--save") + 1]
    metrics = argv[argv.index("--metrics-file") + 1]
    iters = int(argv[argv.index("--train-iters") + 1])
    if recipe["norm-type"] == os.environ.get("FAIL_NORM"):
        print("boom: this cell fails")
        sys.exit(3)
    print("12:00:00 metrics: " + metrics, flush=True)
    os.makedirs(save, exist_ok=True)
    with open(metrics, "a") as f:
        loss = 5.0 + recipe["seed"] / 10
        f.write(json.dumps({"iteration": iters, "val_loss": loss}) + "\\n")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iters))
    """
)


def _fake_runner(tmp_path, spec, **kwargs):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    lines = []
    runner = LocalGridRunner(spec, entry_point=[str(script)], say=lines.append, **kwargs)
    return runner, lines


def test_a_failed_cell_does_not_stop_the_grid_and_is_retried(tmp_path, monkeypatch):
    spec = _spec(tmp_path, norms=("post", "pre", "pre_gpas"))
    monkeypatch.setenv("FAIL_NORM", "post")
    runner, lines = _fake_runner(tmp_path, spec, parallel=2)
    report = runner.run()
    assert len(report.finished) == 4 and [c.norm_type for c in report.failed] == ["post"] * 2
    assert any("FAILED tiny/post/seed1 (exit 3)" in x and "boom" in x for x in lines)
    states = {c.name: cell_state(c, spec.train_iters).state for c in spec.cells()}
    assert states["tiny/post/seed1"] == FAILED and states["tiny/pre/seed2"] == FINISHED

    # Re-run: finished cells are skipped (not started again), failed ones retried.
    monkeypatch.delenv("FAIL_NORM")
    runner, lines = _fake_runner(tmp_path, spec, parallel=1)
    report = runner.run()
    assert len(report.skipped) == 4 and [c.norm_type for c in report.finished] == ["post"] * 2
    assert not any("starting tiny/pre" in x for x in lines)
    for cell in spec.cells():
        state = cell_state(cell, spec.train_iters)
        assert state.state == FINISHED
        assert state.attempts == (2 if cell.norm_type == "post" else 1)


def test_skip_failed_leaves_failed_cells_alone(tmp_path, monkeypatch):
    spec = _spec(tmp_path, norms=("post",), seeds=(1,))
    monkeypatch.setenv("FAIL_NORM", "post")
    _fake_runner(tmp_path, spec)[0].run()
    runner, lines = _fake_runner(tmp_path, spec, retry_failed=False)
    report = runner.run()
    assert not report.finished and len(report.failed) == 1
    assert not any("starting" in x for x in lines)


# -- the table, from results with known values -----------------------------------------------
def _write_result(cell, iters, loss, checkpoint=None):
    checkpoint = iters if checkpoint is None else checkpoint
    os.makedirs(cell.checkpoints, exist_ok=True)
    with open(os.path.join(cell.checkpoints, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(checkpoint))
    with open(cell.metrics_path, "w") as f:
        for it in range(1, iters + 1):
            f.write(json.dumps({"iteration": it, "lm_loss": 9.0 - it / iters}) + "\n")
        f.write(json.dumps({"iteration": iters // 2, "val_loss": loss + 1.0}) + "\n")
        f.write(json.dumps({"iteration": iters, "val_loss": loss}) + "\n")


def test_table_layout_means_stds_and_gpas_differences(tmp_path):
    spec = _spec(
        tmp_path,
        norms=("pre_gpas", "post", "pre", "deeppost"),
        seeds=(1, 2, 3),
        sizes=("tiny", "2x64"),
    )
    losses = {}
    for cell in spec.cells():
        if (cell.size, cell.norm_type, cell.seed) == ("2x64", "deeppost", 3):
            continue  # not finished: no result
        loss = {"post": 4.0, "deeppost": 3.9, "pre": 3.5, "pre_gpas": 3.4}[cell.norm_type]
        loss += 0.01 * cell.seed + (0.2 if cell.size == "2x64" else 0.0)
        if (cell.size, cell.norm_type, cell.seed) == ("tiny", "post", 2):
            _write_result(cell, 4, float("nan"))  # diverged
            continue
        _write_result(cell, 4, loss)
        losses[(cell.size, cell.norm_type, cell.seed)] = loss
    results = table.collect(spec)
    summary = table.summarize(spec, results)

    def expect(size, norm):
        vals = [v for (s, n, _), v in losses.items() if (s, n) == (size, norm)]
        ppl = [math.exp(v) for v in vals]
        return statistics.fmean(ppl), statistics.stdev(ppl), statistics.fmean(vals)

    mean_ppl, std_ppl, mean_loss = expect("tiny", "pre_gpas")
    s = summary[("tiny", "pre_gpas")]
    assert (
        s.n == 3 and s.mean_ppl == pytest.approx(mean_ppl) and s.std_ppl == pytest.approx(std_ppl)
    )
    assert s.mean_loss == pytest.approx(mean_loss)
    assert summary[("tiny", "post")].diverged == 1 and summary[("tiny", "post")].n == 3
    assert summary[("2x64", "deeppost")].n == 2

    md = table.markdown_table(spec, summary, "ppl")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    # The paper's order (each GPAS variant under its base), whatever order was asked for.
    assert [r.split("`")[1] for r in rows] == ["post", "deeppost", "pre", "pre_gpas"]
    gpas_row = rows[3]
    diff = expect("tiny", "pre_gpas")[0] - expect("tiny", "pre")[0]
    assert f"{mean_ppl:.2f} ± {std_ppl:.2f} ({diff:+.2f})" in gpas_row
    assert "1 diverged" in rows[0] and "2/3 seeds" in rows[1]

    parsed = list(csv.DictReader(io.StringIO(table.summary_csv(spec, summary))))
    row = next(r for r in parsed if (r["size"], r["norm_type"]) == ("2x64", "pre_gpas"))
    d = expect("2x64", "pre_gpas")[0] - expect("2x64", "pre")[0]
    assert row["base"] == "pre" and float(row["val_ppl_minus_base"]) == pytest.approx(d, rel=1e-5)
    table.plot_loss_curves(spec, str(tmp_path / "curves.png"))
    assert os.path.getsize(tmp_path / "curves.png") > 10_000


def test_table_rows_come_from_the_norm_type_table(monkeypatch):
    """The paper's order (Table 1 of the GPAS paper), and a row added to the architecture table
    reaches the results table under its base without touching the grid's code."""
    import dataclasses

    from megatron_ext import variants

    paper = ["post", "deeppost", "deeppost_gpas", "pre", "pre_gpas", "sandwich", "sandwich_gpas",
             "post_pre", "post_pre_gpas", "lns", "lns_gpas"]  # fmt: skip
    assert list(table.PAPER_ORDER) == paper
    assert sorted(paper) == sorted(NORM_TYPE_NAMES)
    assert {n: table.base_of(n) for n in paper if table.base_of(n)} == {
        n: n[: -len("_gpas")] for n in paper if n.endswith("_gpas")
    }
    extra = dataclasses.replace(variants.NORM_TYPES["post"], name="post_gpas", base="post")
    monkeypatch.setitem(variants.NORM_TYPES, "post_gpas", extra)
    order = variants.paper_order()
    assert order[:2] == ("post", "post_gpas") and len(order) == len(paper) + 1


def test_a_cell_is_finished_only_when_its_checkpoint_reached_the_end(tmp_path):
    spec = _spec(tmp_path, norms=("pre",), seeds=(1,), iters=4)
    cell = spec.cells()[0]
    assert cell_state(cell, 4).state == PENDING
    _write_result(cell, 4, 3.0, checkpoint=2)  # evaluated, but killed before the last save
    assert cell_state(cell, 4).state == INTERRUPTED
    assert table.collect(spec)[0].val_loss is None


# -- a real grid, end to end -----------------------------------------------------------------
def _metrics_iteration(path):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return 0
    its = [json.loads(x).get("iteration", 0) for x in lines if x.strip().endswith("}")]
    return max(its, default=0)


@pytest.mark.slow
def test_tiny_grid_interrupted_resumed_and_tabulated(tmp_path):
    iters = 30
    out = str(tmp_path / "grid")
    shared = [*SHARED, "--train-iters", str(iters), "--log-interval", "1", "--eval-interval",
              "15", "--eval-iters", "2", "--save-interval", "15", "--lr", "3e-3"]  # fmt: skip
    cmd = grid_command("run", out, ["pre", "pre_gpas"], [1, 2], "--parallel", "1", "--", *shared)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = os.path.join(out, "cells", "tiny", "pre", "seed1", "metrics.jsonl")
    deadline = time.time() + 300
    while _metrics_iteration(first) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    assert "interrupted tiny/pre/seed1 at iteration" in output
    spec = GridSpec.load(out)
    spec.validate()
    first_cell = spec.cells()[0]
    stopped = cell_state(first_cell, iters)
    assert stopped.state == INTERRUPTED and 3 <= stopped.iteration < iters, output
    assert all(cell_state(c, iters).state == PENDING for c in spec.cells()[1:])

    # Re-run with --out alone: the interrupted cell resumes from its checkpoint, the rest run.
    proc = subprocess.run(
        [sys.executable, RUN_GRID, "run", "--out", out], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming tiny/pre/seed1 from iteration {stopped.iteration}" in proc.stdout
    log = open(os.path.join(first_cell.logs, "attempt2.log")).read()
    assert f"resumed from iteration {stopped.iteration}" in log
    assert all(cell_state(c, iters).state == FINISHED for c in spec.cells())
    assert "Warning" not in proc.stdout + proc.stderr  # quiet entry points

    proc = subprocess.run([sys.executable, GRID_TABLE, out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "cells.csv"))))
    assert len(rows) == 4 and all(r["state"] == "finished" for r in rows)
    for r in rows:  # the table's value is the run's own final validation record
        cell = next(
            c for c in spec.cells() if (c.norm_type, str(c.seed)) == (r["norm_type"], r["seed"])
        )
        final = [json.loads(x) for x in open(cell.metrics_path) if "val_loss" in x][-1]
        assert final["iteration"] == iters
        assert float(r["val_loss"]) == pytest.approx(final["val_loss"], rel=1e-5)
    assert "Pre-LN+GPAS (`pre_gpas`)" in open(os.path.join(out, "table.md")).read()
    assert os.path.getsize(os.path.join(out, "loss_curves.png")) > 10_000


@pytest.mark.parametrize(
    "modules",
    [
        # polling a grid stays cheap: pointers and metrics files through the torch-free modules
        "megatron_ext.grid.table, megatron_ext.grid.runner, megatron_ext.grid.status",
        # a run's configuration can be built and validated anywhere (a login node, a notebook)
        "megatron_ext.config",
        # where checkpoints live, the --save lock, the restart ledger and the exit codes are
        # read by launchers and tools that have no torch
        "megatron_ext.checkpoint.layout, megatron_ext.checkpoint.manifest, "
        "megatron_ext.resilience.run_lock, megatron_ext.resilience.restart_ledger, "
        "megatron_ext.resilience.exit_codes",
    ],
)
def test_imports_without_torch(modules):
    code = (
        f"import sys, {modules};"
        "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
