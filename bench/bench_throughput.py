"""Training throughput on one GPU: tokens/s, TFLOP/s and MFU, pre vs pre_gpas side by side.

Synthetic tokens, bf16 with fp32 master weights (Float16Module + megatron-core's optimizer),
Adam, the local (non-Transformer-Engine) spec unless --transformer-impl says otherwise;
--fp8-format runs the GEMMs in FP8 through Transformer Engine.

    python bench/bench_throughput.py --model-size 1b --micro-batch-size 32 --num-microbatches 4
    python bench/bench_throughput.py --model-size 7b --num-layers 4 --micro-batch-size 8
    python bench/bench_throughput.py --model-size 1b --ffn-hidden-size 5504   # aligned FFN
    python bench/bench_throughput.py --transformer-impl transformer_engine --fp8-format hybrid

FLOPs use Megatron-LM's formula (megatron_ext/training/flops.py); MFU uses the dense bf16 peak,
for FP8 runs too (the convention of Megatron-LM's reports), so FP8 shows as a higher MFU.

Fused kernels follow the training CLI's defaults (``--fusion off``: none; ``--fusion all``: also
cross-entropy fusion).
``--profile FILE`` appends, after the timed iterations, a torch.profiler breakdown of two more
(GPU busy share, time per kernel category, top kernels;
megatron_ext/training/kernel_profile.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

MEASURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput_measure.py")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _measure_in_fresh_process(norm_type, args):
    """Each norm type in its own process (``throughput_measure.py``), so one model's memory
    cannot inflate the next peak; this one imports no more than torch."""
    cmd = [sys.executable, MEASURE]
    for key, value in vars(args).items():
        if key in ("json", "norm_types") or value is None or value is False:
            continue
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    proc = subprocess.run([*cmd, norm_type], stdout=subprocess.PIPE, text=True)  # stderr: ours
    if proc.returncode != 0:
        sys.exit(f"error: measuring {norm_type} failed (exit {proc.returncode}); see above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    """The flags, shared with each measuring process."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="1b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="override the preset's FFN width (e.g. 5504 for the 1b preset's 5461)",
    )
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--num-microbatches", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--transformer-impl", default="local")
    p.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run (emulation)"
    )
    p.add_argument("--fp8-format", default=None, help="hybrid or e4m3 (needs transformer_engine)")
    p.add_argument("--fp8-recipe", default="delayed", help="delayed or tensorwise")
    p.add_argument(
        "--fusion",
        default="auto",
        choices=("auto", "off", "all"),
        help="fused kernels: the CLI's defaults, none, or those plus cross-entropy fusion",
    )
    p.add_argument(
        "--fast-path",
        default="on",
        choices=("on", "off"),
        help="the no-TE fast path (SDPA attention, device-side grad norms, fused Adam) or "
        "megatron-core's local path",
    )
    p.add_argument("--profile", default=None, help="append a kernel breakdown to this file")
    p.add_argument("--norm-types", default="pre,pre_gpas")
    p.add_argument("--json", default=None, help="append the results as one JSON line here")
    return p


def main():
    args = build_parser().parse_args()
    header = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(args.device),
        "torch": torch.__version__,
        **{k: v for k, v in vars(args).items() if k != "json"},
    }
    print(json.dumps(header))
    rows = [_measure_in_fresh_process(nt, args) for nt in args.norm_types.split(",")]
    for row in rows:
        print(json.dumps(row))
    if len(rows) == 2:
        print(
            f"step-time ratio {rows[1]['norm_type']}/{rows[0]['norm_type']}: "
            f"{rows[1]['iter_ms'] / rows[0]['iter_ms']:.4f}"
        )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"header": header, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
