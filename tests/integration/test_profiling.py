"""--profile: which iterations a window records (torch.profiler and the nsys bracket), what it
writes, early exits and resumes, the flag checks, and one CPU training run with a trace."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_ext.config import ConfigError, ProfileConfig
from megatron_ext.planning.arguments import parse_run_config
from megatron_ext.training.components.profiler import IterationProfiler
from tests.helpers import ROOT
from tests.helpers.dist_workers import run_cli, run_ranks


def _cfg(tmp_path, **kw):
    kw.setdefault("profile", True)
    kw.setdefault("use_pytorch_profiler", True)
    return ProfileConfig(profile_dir=str(tmp_path / "prof"), **kw)


def _profiler(cfg, rank, device, run_dir):
    """A profiler whose messages are kept in its ``messages`` list."""
    messages = []
    ctx = SimpleNamespace(rank=rank, device=device, run_dir=run_dir)
    profiler = IterationProfiler(cfg, ctx, say=messages.append)
    profiler.messages = messages
    return profiler


def _said(profiler, action):
    """The messages ``action()`` made the profiler say."""
    before = len(profiler.messages)
    action()
    return profiler.messages[before:]


def _close(profiler):
    said = _said(profiler, profiler.close)
    return said[0] if said else None


def _drive(profiler, first, last):
    """Run iterations first..last (1-based) through the profiler's hooks, each one matrix
    product and 2·(iteration number) ``aten::mul``; the messages."""
    a = torch.randn(32, 32)

    def iterations():
        for it in range(first, last + 1):
            profiler.before_step(it)
            a @ a
            for _ in range(2 * it):
                a * 2.0
            profiler.after_step(SimpleNamespace(iteration=it))

    return _said(profiler, iterations)


def _recorded_steps(trace_path):
    events = json.load(open(trace_path))["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def _calls_per_iteration(summary_path, op):
    """calls/iter of ``op`` in the summary's top-kernel table (ms, share, calls, mean, name)."""
    for line in open(summary_path).read().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[-1] == op:
            return float(fields[2])
    raise AssertionError(f"{op} not in {summary_path}")


@pytest.mark.parametrize("start,end", [(2, 4), (0, 2), (3, 6)])
def test_window_records_iterations_start_plus_one_to_end(tmp_path, start, end):
    profiler = _profiler(
        _cfg(tmp_path, profile_step_start=start, profile_step_end=end), 0, "cpu", "unused"
    )
    messages = _drive(profiler, 1, 8)
    stem = f"rank0_iters{start + 1}-{end}"
    trace = tmp_path / "prof" / f"trace_{stem}.json"
    summary = tmp_path / "prof" / f"kernels_{stem}.txt"
    assert messages == [f"rank 0: profile written to {trace}, {summary}"]
    assert len(_recorded_steps(trace)) == end - start
    # exactly iterations start+1..end are counted: one matmul each, and 2·it multiplications
    assert _calls_per_iteration(summary, "aten::matmul") == 1
    assert _calls_per_iteration(summary, "aten::mul") == start + 1 + end
    text = summary.read_text()
    assert text.startswith(f"iterations {start + 1}-{end} on rank 0 (cpu)")
    assert re.search(r"^gemm ", text, re.M)
    assert _close(profiler) is None  # nothing left running
    assert not list((tmp_path / "prof").glob("*.tmp"))


def test_other_ranks_and_a_disabled_profile_write_nothing(tmp_path):
    for cfg, rank in ((_cfg(tmp_path, profile_ranks=[1]), 0), (_cfg(tmp_path, profile=False), 0)):
        profiler = _profiler(cfg, rank, "cpu", "unused")
        assert _drive(profiler, 1, 14) == [] and _close(profiler) is None
    assert not (tmp_path / "prof").exists()


def test_default_directory_and_a_run_resumed_at_the_window(tmp_path):
    cfg = ProfileConfig(
        profile=True, use_pytorch_profiler=True, profile_step_start=4, profile_step_end=6
    )
    profiler = _profiler(cfg, 0, "cpu", str(tmp_path / "run"))
    _drive(profiler, 5, 7)  # resumed after 4 completed iterations: no warm-up iteration left
    trace = tmp_path / "run" / "profile" / "trace_rank0_iters5-6.json"
    assert len(_recorded_steps(trace)) == 2


def test_a_run_resumed_past_the_window_start_does_not_profile(tmp_path):
    cfg = _cfg(tmp_path, profile_step_start=2, profile_step_end=6)
    at_start = _profiler(cfg, 0, "cpu", "unused")
    at_start.on_start(SimpleNamespace(iteration=2))
    assert at_start.messages == [] and at_start.enabled  # the window can still start
    profiler = _profiler(cfg, 0, "cpu", "unused")
    profiler.on_start(SimpleNamespace(iteration=3))
    assert profiler.messages == [
        "rank 0: --profile window 3-6 starts before the resumed iteration 4; not profiling"
    ]
    assert _drive(profiler, 4, 8) == [] and _close(profiler) is None
    assert not (tmp_path / "prof").exists()


def test_a_run_ending_inside_the_window_keeps_what_it_recorded(tmp_path):
    profiler = _profiler(
        _cfg(tmp_path, profile_step_start=2, profile_step_end=6), 0, "cpu", "unused"
    )
    assert _drive(profiler, 1, 4) == []  # iterations 3 and 4 recorded, window open
    message = _close(profiler)
    trace = tmp_path / "prof" / "trace_rank0_iters3-6.json"
    assert message.startswith("rank 0: profile written to") and str(trace) in message
    assert len(_recorded_steps(trace)) >= 2  # the last step annotation runs up to close()
    summary = tmp_path / "prof" / "kernels_rank0_iters3-6.txt"
    assert summary.read_text().startswith("iterations 3-4 on rank 0")
    assert _calls_per_iteration(summary, "aten::matmul") == 1
    assert _calls_per_iteration(summary, "aten::mul") == 3 + 4


def test_a_run_ending_before_the_window_records_nothing(tmp_path):
    profiler = _profiler(
        _cfg(tmp_path, profile_step_start=2, profile_step_end=4), 0, "cpu", "unused"
    )
    _drive(profiler, 1, 2)  # only the unrecorded warm-up iteration ran
    assert "before any profiled iteration" in _close(profiler)
    assert not (tmp_path / "prof").exists()


def test_nsys_bracket_without_the_torch_profiler(tmp_path, monkeypatch):
    calls = []

    class FakeCudart:
        def cudaProfilerStart(self):
            calls.append("start")

        def cudaProfilerStop(self):
            calls.append("stop")

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    cfg = _cfg(tmp_path, use_pytorch_profiler=False, profile_step_start=2, profile_step_end=4)
    profiler = _profiler(cfg, 0, "cuda", "unused")
    messages = _drive(profiler, 1, 6)
    assert calls == ["start", "iteration 3", "pop", "iteration 4", "pop", "stop"]
    assert messages == ["rank 0: cudaProfilerStop after iteration 4"]
    assert _close(profiler) is None and not (tmp_path / "prof").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--use-pytorch-profiler"], "--use-pytorch-profiler: needs --profile"),
        (["--profile"], "--profile: without --use-pytorch-profiler"),
        (
            [
                "--profile",
                "--use-pytorch-profiler",
                "--profile-step-start",
                "5",
                "--profile-step-end",
                "5",
            ],
            "--profile-step-end: must be after --profile-step-start 5",
        ),
        (
            ["--profile", "--use-pytorch-profiler", "--profile-step-end", "30"],
            "--profile-step-end: 30 is after the last iteration (--train-iters 20)",
        ),
        (
            ["--profile", "--use-pytorch-profiler", "--profile-ranks", "0", "2"],
            "--profile-ranks: rank(s) [2] do not exist in a world of 1 process(es)",
        ),
        (
            ["--profile", "--use-pytorch-profiler", "--profile-step-start", "-1"],
            "--profile-step-start: must be ≥ 0",
        ),
    ],
)
def test_profile_flags_are_checked(flags, message):
    cfg = parse_run_config(["--device", "cpu", "--train-iters", "20", "--mock-data", *flags])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=1)
    assert message in str(err.value)


def test_profile_ranks_parse_as_integers():
    cfg = parse_run_config(["--profile-ranks", "0", "1"])
    assert cfg.profiling.profile_ranks == [0, 1]


def _train_args(save, *extra):
    args = ["--device", "cpu", "--model-size", "tiny", "--norm-type", "pre_gpas", "--mock-data"]
    args += ["--vocab-size", "512", "--micro-batch-size", "2", "--global-batch-size", "4"]
    args += ["--train-iters", "5", "--log-interval", "1", "--eval-interval", "100"]
    args += ["--eval-iters", "0", "--num-workers", "0", "--save", save, "--profile"]
    args += ["--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "3"]
    return args + list(extra)


@pytest.mark.slow
def test_training_run_writes_a_trace_of_the_window(tmp_path):
    save = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *_train_args(save)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    trace = os.path.join(save, "profile", "trace_rank0_iters2-3.json")
    assert f"rank 0: profile written to {trace}" in out
    assert len(_recorded_steps(trace)) == 2
    summary = open(os.path.join(save, "profile", "kernels_rank0_iters2-3.txt")).read()
    assert "gemm" in summary
    assert "iter       5/5" in out  # training went on after the window


@pytest.mark.slow
def test_only_the_chosen_rank_profiles(tmp_path):
    save = str(tmp_path / "run")
    codes = run_ranks(run_cli, 2, (_train_args(save, "--profile-ranks", "1"),), tmp_path)
    assert codes == [0, 0]
    assert sorted(os.listdir(os.path.join(save, "profile"))) == [
        "kernels_rank1_iters2-3.txt",
        "trace_rank1_iters2-3.json",
    ]
