"""Speed of a model's matrix products at its own shapes, for several FFN widths side by side.

A training step is mostly GEMMs, so their speed at the model's shapes bounds its MFU. The 1b
preset keeps the reference's FFN width 5461, an odd number: a bf16 GEMM whose dimensions are not
multiples of 8 cannot use the fastest tensor-core kernels. This benchmark times the forward,
input-gradient and weight-gradient product of every linear layer of one transformer layer, and
of the output layer, at the preset's shapes (tensor-parallel size 1) and reports:

- per product: time and TFLOP/s;
- per FFN width: the layer's GEMM time, the time per FLOP relative to the first width given
  (< 1: that width is faster per FLOP), and the linear layers' FLOP rate as a share of the
  device's bf16 peak: a ceiling for the step's MFU (attention, norms, the loss, the optimizer
  and idle time only lower it).

    python bench/bench_gemm_shapes.py --model-size 1b --ffn-hidden-sizes 5461,5472,5504
    python bench/bench_gemm_shapes.py --device cpu --model-size tiny --dtype fp32   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import dataclass, replace

import torch

from megatron_ext.models.presets import model_preset
from megatron_ext.training.flops import device_peak_tflops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    per_layer: float  # how many of it one transformer layer has (the output layer: 1/L)


def model_linears(cfg) -> list[Linear]:
    """The linear layers of one transformer layer of ``cfg`` (SwiGLU: fc1 is [gate; up])."""
    q = cfg.kv_channels * cfg.num_attention_heads
    kv = cfg.kv_channels * cfg.query_groups
    return [
        Linear("qkv", cfg.hidden_size, q + 2 * kv, 1),
        Linear("proj", q, cfg.hidden_size, 1),
        Linear("fc1", cfg.hidden_size, 2 * cfg.ffn_hidden_size, 1),
        Linear("fc2", cfg.ffn_hidden_size, cfg.hidden_size, 1),
        Linear("output", cfg.hidden_size, cfg.padded_vocab_size(), 1 / cfg.num_layers),
    ]


def products(linear: Linear, tokens: int):
    """(pass, (m, k, n)) of the three products a linear layer runs per step: y = x·Wᵀ,
    dx = dy·W and dW = dyᵀ·x (x: [tokens, in], W: [out, in])."""
    i, o = linear.in_features, linear.out_features
    return [("fwd", (tokens, i, o)), ("dgrad", (tokens, o, i)), ("wgrad", (o, tokens, i))]


def _operands(kind, m, k, n, dtype, device):
    """Operands laid out as the layer's autograd has them (W row-major [out, in])."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if kind == "fwd":  # x [m, k] · (W [n, k])ᵀ
        return rand(m, k), rand(n, k).t()
    if kind == "dgrad":  # dy [m, k] · W [k, n]
        return rand(m, k), rand(k, n)
    return rand(k, m).t(), rand(k, n)  # dyᵀ: (dy [k, m])ᵀ · x [k, n]


def time_matmul(a, b, repeats: int, device: str) -> float:
    """Median seconds of ``a @ b`` over ``repeats`` runs after warm-up."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_width(cfg, tokens: int, dtype, repeats: int, device: str) -> dict:
    rows, layer_s, layer_flops = [], 0.0, 0.0
    for linear in model_linears(cfg):
        for kind, (m, k, n) in products(linear, tokens):
            seconds = time_matmul(*_operands(kind, m, k, n, dtype, device), repeats, device)
            flops = 2.0 * m * k * n
            rows.append(
                {
                    "gemm": f"{linear.name}.{kind}",
                    "mkn": [m, k, n],
                    "ms": round(seconds * 1e3, 4),
                    "tflops": round(flops / seconds / 1e12, 2),
                }
            )
            layer_s += linear.per_layer * seconds
            layer_flops += linear.per_layer * flops
    return {
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "layer_s": layer_s,
        "flops": layer_flops,
        "gemms": rows,
    }


def summarize(results: list[dict], num_layers: int, peak_tflops) -> list[str]:
    """One line per width: GEMM time per layer, time per FLOP vs the first width, share of peak."""
    base = results[0]["layer_s"] / results[0]["flops"]
    lines = []
    for r in results:
        tflops = r["flops"] / r["layer_s"] / 1e12
        line = (
            f"ffn {r['ffn_hidden_size']:>6}: GEMMs per layer {r['layer_s'] * 1e3:8.3f} ms "
            f"({tflops:6.1f} TFLOP/s), time per FLOP vs ffn {results[0]['ffn_hidden_size']}: "
            f"{r['layer_s'] / r['flops'] / base:.3f}"
        )
        if peak_tflops:
            line += f", {tflops / peak_tflops:.1%} of peak"
        lines.append(line)
    lines.append(f"(per layer: {num_layers} layers share the output layer's products)")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="1b")
    p.add_argument(
        "--ffn-hidden-sizes",
        default=None,
        help="comma-separated FFN widths to compare (default: the preset's own)",
    )
    p.add_argument("--tokens", type=int, default=8192, help="micro-batch × sequence length")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", default=None, help="append the results as one JSON line here")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu for a smoke run")
    cfg = model_preset(args.model_size)
    widths = (
        [int(w) for w in args.ffn_hidden_sizes.split(",")]
        if args.ffn_hidden_sizes
        else [cfg.ffn_hidden_size]
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = [
        measure_width(
            replace(cfg, ffn_hidden_size=w),
            args.tokens,
            DTYPES[args.dtype],
            args.repeats,
            args.device,
        )
        for w in widths
    ]
    for r in results:
        for g in r["gemms"]:
            print(
                f"ffn {r['ffn_hidden_size']:>6} {g['gemm']:<13} m,k,n={g['mkn']}: "
                f"{g['ms']:.4f} ms {g['tflops']:8.2f} TFLOP/s"
            )
    peak = device_peak_tflops(device_name) if args.dtype == "bf16" else None
    for line in summarize(results, cfg.num_layers, peak):
        print(line)
    if args.json:
        header = {
            "date": datetime.date.today().isoformat(),
            "device": device_name,
            "torch": torch.__version__,
            **vars(args),
        }
        with open(args.json, "a") as f:
            f.write(json.dumps({"header": header, "results": results}) + "\n")


if __name__ == "__main__":
    main()
