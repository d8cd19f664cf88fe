"""The GPU-side shell scripts: they parse, and tools/install_te_offline.sh refuses an incomplete
wheel directory before touching TARGET (the rest of both needs a GPU)."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "install_te_offline.sh")


@pytest.mark.parametrize("script", ["tools/install_te_offline.sh", "bench/run_gpu_suite.sh"])
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "run_gpu_suite.sh"), str(out), "gemm"],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 1 and summary[0].split()[:2] == ["gemm", "rc=2"]
    assert "--device cuda: no CUDA device here" in (out / "gemm.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "gemm.log", "summary.txt"]
