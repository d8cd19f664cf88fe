"""The GPU-side shell scripts: they parse; tools/install_te_offline.sh refuses an incomplete
wheel directory before touching TARGET; bench/gpu_check.sh runs each check's exact commands at a
tiny shape on CPU (dry run), and its suite records each part's outcome."""

import os
import re
import subprocess

import pytest

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "tools", "install_te_offline.sh")


@pytest.mark.parametrize("script", ["tools/install_te_offline.sh", "bench/gpu_check.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def _run(wheels, target, steps="unpack bindings check"):
    return subprocess.run(
        ["bash", SCRIPT, str(wheels), str(target)],
        env={**os.environ, "STEPS": steps},
        capture_output=True,
        text=True,
    )


def test_missing_core_wheel_is_named(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "transformer_engine-2.20.2-py3-none-any.whl").write_bytes(b"")
    proc = _run(wheels, tmp_path / "site")
    assert proc.returncode == 2
    assert "exactly one transformer_engine_cu*.whl (core), found 0" in proc.stderr
    assert not (tmp_path / "site").exists()  # refused before creating anything


def test_compiling_alone_needs_only_the_sdist(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = _run(wheels, tmp_path / "site", steps="bindings")
    assert proc.returncode == 2
    assert "transformer_engine_torch-*.tar.gz (sdist), found 0" in proc.stderr


def test_reused_bindings_must_exist(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = subprocess.run(
        ["bash", SCRIPT, str(wheels), str(tmp_path / "site")],
        env={**os.environ, "STEPS": "bindings", "BINDINGS_SO": str(tmp_path / "missing.so")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"BINDINGS_SO={tmp_path / 'missing.so'} is not a file" in proc.stderr


def test_suite_runs_a_part_and_records_its_outcome(tmp_path):
    """The suite's plumbing on a machine without a GPU: the gemm part runs the benchmark with
    the project importable (it reaches its own 'no CUDA device' check rather than an
    ImportError), logs it, and the summary records the exit status; other parts do not run."""
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPU_CHECK_DRY_RUN")}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "suite", str(out), "gemm"],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 2 and summary[0].split()[:2] == ["gemm", "rc=2"], summary
    assert summary[1] == "done: 1 runs, 0 succeeded"
    assert "--device cuda: no CUDA device here" in (out / "check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "device.txt", "summary.txt"]


def _gpu_check(check, out):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), check, str(out)],
        env={**os.environ, "GPU_CHECK_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_check_a_dry_run_runs_every_command_on_cpu(tmp_path):
    """Check A's exact commands at a tiny shape on CPU: a GPU window is never lost to a typo."""
    import json

    out = tmp_path / "a"
    proc = _gpu_check("A", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    runs = [line.split()[0] for line in summary[:-1]]
    assert runs == ["collect", "tests", "gemm", "1b_fast", "1b_twin_fast", "1b_slow",
                    "1b_twin_profile", "7b_shape"]  # fmt: skip
    assert all(" rc=0 " in line for line in summary[:-1]), summary
    log = (out / "check.log").read_text()
    # the GPU selection is collected (it can only skip here); its CPU twins really run
    gpu_selected = re.search(r"(\d+)(?:/\d+)? tests? collected", log)
    assert gpu_selected and int(gpu_selected.group(1)) >= 10, log[-2000:]
    ran = re.search(r"(\d+) passed", log)
    assert ran and int(ran.group(1)) >= 10 and " failed" not in log, log[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"check.log", "device.txt", "gemm.jsonl", "profile.txt", "throughput.jsonl"} <= set(
        files
    )
    rows = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert [r["header"]["fast_path"] for r in rows] == ["on", "on", "off", "on", "on"]
    assert rows[1]["header"]["ffn_hidden_size"] == 192  # the aligned twin's width, dry-run size


@pytest.mark.slow
def test_check_b_dry_run_commands_parse(tmp_path):
    """Check B needs Transformer Engine, absent here: its runs fail, but none on a bad flag."""
    out = tmp_path / "b"
    _gpu_check("B", out)
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 1 + 1 + 6 + 1  # tests, TE twin, 2 × (bf16 + 2 FP8 recipes), done
    log = (out / "check.log").read_text()
    assert "unrecognized arguments" not in log and "invalid choice" not in log
    # every throughput run stopped for the missing Transformer Engine, and said so
    assert log.count("--transformer-impl transformer_engine needs Transformer Engine") == 7, log


@pytest.mark.slow
def test_check_c_dry_run_runs_every_command_on_cpu(tmp_path):
    """Check C at a tiny shape on CPU: SFT with LISA against full fine-tuning, and a frozen rank
    detected and restarted with the timeouts it learned."""
    import json

    out = tmp_path / "c"
    proc = _gpu_check("C", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary[:-1]] == ["sft_lisa", "hang_nccl"]
    assert all(" rc=0 " in line for line in summary[:-1]), (out / "check.log").read_text()[-3000:]
    (sft,) = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert [r["lisa_layers"] for r in sft["runs"]] == [0, 2]
    assert sft["args"]["overlap_grad_reduce"]
    (faults,) = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    hang = faults["hang"]
    assert hang["ranks"] == 1 and hang["hang_line"].startswith("hang: rank 0 ")
    assert "step" in hang["learned"] and hang["reloaded"] == hang["learned"]
