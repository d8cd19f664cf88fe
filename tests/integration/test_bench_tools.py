"""The throughput benchmark and its kernel breakdown: interval arithmetic and kernel kinds
checked against hand-made events, and a CPU smoke run of bench/bench_throughput.py."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_gemm_shapes import model_linears, products  # noqa: E402

from megatron_ext.models.presets import model_preset  # noqa: E402
from megatron_ext.training.flops import flops_per_iteration  # noqa: E402
from megatron_ext.training.kernel_profile import (  # noqa: E402
    KernelEvent,
    busy_us,
    category,
    summarize,
)


def test_busy_time_counts_overlaps_once():
    events = [
        KernelEvent("a", 0, 10),
        KernelEvent("b", 5, 12),  # overlaps a by 5
        KernelEvent("c", 6, 8),  # inside b
        KernelEvent("d", 20, 25),  # after a gap of 8
    ]
    assert busy_us(events) == 12 + 5
    assert busy_us(list(reversed(events))) == 17
    assert busy_us([]) == 0


@pytest.mark.parametrize(
    "name,kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_NTN", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
        ("void transformer_engine::rmsnorm_fwd_tuned_kernel<...>", "norm"),
        ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<...>>", "optimizer"),
        ("triton_poi_fused_mul_silu_0", "triton (fused)"),
        ("bwd_partial", "triton (fused)"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "elementwise/reduce"),
        ("Memcpy DtoD (Device -> Device)", "copy/fill"),
        ("aten::mm", "gemm"),
        ("something_new", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert category(name) == kind


def test_summary_reports_per_iteration_numbers():
    # two iterations of: a 3 ms GEMM and a 1 ms norm, with 1 ms idle each → 8 ms of wall
    events = []
    for start in (0, 5000):
        events += [
            KernelEvent("nvjet_gemm", start, start + 3000),
            KernelEvent("rmsnorm_fwd", start + 3000, start + 4000),
        ]
    text = summarize(events, iterations=2, wall_ms=5.0)
    assert "device busy 4.0 ms (80.0%), idle 1.0 ms; 2 kernels/iter" in text
    assert any(line.split()[:3] == ["gemm", "3.00", "75.0%"] for line in text.splitlines())


def _run_bench(script, args, cwd):
    """Run bench/SCRIPT as a user does (a script, the project on PYTHONPATH); must succeed."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_throughput_bench_runs_on_cpu_and_writes_the_profile(tmp_path):
    profile, results = tmp_path / "profile.txt", tmp_path / "results.jsonl"
    args = ["--device", "cpu", "--model-size", "tiny4", "--seq-length", "32"]
    args += ["--micro-batch-size", "2", "--num-microbatches", "2", "--iters", "2", "--warmup", "1"]
    args += ["--profile", str(profile), "--json", str(results)]
    proc = _run_bench("bench_throughput.py", args, tmp_path)
    record = json.loads(results.read_text())
    assert [r["norm_type"] for r in record["rows"]] == ["pre", "pre_gpas"]
    for row in record["rows"]:
        assert row["tokens_per_s"] == pytest.approx(2 * 2 * 32 / (row["iter_ms"] / 1e3), rel=0.01)
        assert 4 < row["loss"] < 8  # ≈ ln(vocab) for an untrained model
    assert "step-time ratio pre_gpas/pre" in proc.stdout
    report = profile.read_text()
    assert report.count("## pre") == 2 and "top 25 kernels" in report
    assert "gemm" in report  # the CPU's matrix products are found and named


@pytest.mark.parametrize("groups", [None, 8])
def test_gemm_shapes_are_the_models_linear_layers(groups):
    """The products the GEMM benchmark times add up to the linear-layer part of Megatron-LM's
    FLOP formula (everything but the attention scores), for MHA and GQA."""
    cfg = model_preset("1b", num_query_groups=groups)
    tokens = 8192
    timed = 0.0
    for linear in model_linears(cfg):
        for _, (m, k, n) in products(linear, tokens):
            assert sorted((m, k, n)) == sorted((tokens, linear.in_features, linear.out_features))
            timed += linear.per_layer * 2 * m * k * n
    s, h, L = cfg.seq_length, cfg.hidden_size, cfg.num_layers
    scores = 6 * L * h * s  # the causal-halved QKᵀ and AV per token (q = h here)
    expected = flops_per_iteration(cfg, tokens // s, s, cfg.padded_vocab_size()) / tokens - scores
    assert timed * L / tokens == pytest.approx(expected, rel=1e-12)


def test_gemm_bench_runs_on_cpu(tmp_path):
    results = tmp_path / "gemm.jsonl"
    args = ["--device", "cpu", "--model-size", "tiny", "--dtype", "fp32", "--tokens", "64"]
    args += ["--ffn-hidden-sizes", "176,171", "--repeats", "2", "--json", str(results)]
    proc = _run_bench("bench_gemm_shapes.py", args, tmp_path)
    record = json.loads(results.read_text())
    assert [r["ffn_hidden_size"] for r in record["results"]] == [176, 171]
    fc2 = [g for g in record["results"][1]["gemms"] if g["gemm"] == "fc2.wgrad"]
    assert fc2[0]["mkn"] == [64, 64, 171]  # dW [hidden, ffn] = dyᵀ [hidden, tokens] · x
    assert "time per FLOP vs ffn 176: 1.000" in proc.stdout
