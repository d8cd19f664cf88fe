#!/usr/bin/env python3
"""The step cost of SFT with LISA against full fine-tuning, on the same model, side by side.

Runs the training CLI with ``--sft`` twice (``--lisa-layers 0``: every layer trains; then
``--lisa-layers K``) on the same model and data, and prints the median step time, tokens/s and
peak memory (GPU: ``torch.cuda.max_memory_allocated`` from the metrics file; CPU: the peak RSS
of the process tree).

    python bench/bench_sft.py --device cpu --iters 20   # 8 layers × 512, 8k vocabulary
    python bench/bench_sft.py --device cuda --model-size 1b --seq-length 256 --micro-batch-size 8 \
        --lisa-layers 4 --overlap-grad-reduce

Results are appended to ``bench/results/sft.jsonl`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

from process_stats import append_result, run_measured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "sft.jsonl")


def _run(args, lisa_layers: int, save: str) -> dict:
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), "--device", args.device,
            "--norm-type", "pre_gpas", "--sft", "--mock-data", "--vocab-size", str(args.vocab_size),
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters),
            "--lr", "3e-4", "--lisa-layers", str(lisa_layers), "--lisa-interval", "5",
            "--log-interval", "1", "--eval-interval", str(args.iters * 10), "--eval-iters", "1",
            "--num-workers", "0",
            "--metrics-file", os.path.join(save, "metrics.jsonl")]  # fmt: skip
    if args.model_size:
        argv += ["--model-size", args.model_size]
    else:
        argv += ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                 "--ffn-hidden-size", str(args.hidden_size * 8 // 3 // 64 * 64),
                 "--num-attention-heads", str(max(1, args.hidden_size // 64))]  # fmt: skip
    if args.device == "cuda":
        argv += ["--bf16"]
    if args.overlap_grad_reduce:
        argv += ["--overlap-grad-reduce"]
    seconds, peak_rss, _ = run_measured(argv, cwd=ROOT)
    steps = [json.loads(x) for x in open(os.path.join(save, "metrics.jsonl")) if '"lm_loss"' in x]
    warm = steps[len(steps) // 4 :]  # the first quarter warms up
    step_s = statistics.median(r["step_time_s"] for r in warm)
    return {
        "lisa_layers": lisa_layers,
        "median_step_s": step_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
        "peak_gpu_gib": max((r.get("mem_gib") or 0.0) for r in steps) or None,
        "peak_rss_gib": peak_rss / 2**30,
        "wall_s": seconds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model-size", default=None, help="a preset (else the shape flags below)")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="small, so that the decoder layers carry most of the FLOPs",
    )
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lisa-layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--overlap-grad-reduce", action="store_true", help="passed to both runs")
    p.add_argument("--json", default=RESULTS, help="the results file (appended)")
    args = p.parse_args(argv)
    result = {"args": vars(args), "machine": f"{platform.node()} ({os.cpu_count()} CPUs)"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for k in (0, args.lisa_layers):
            save = os.path.join(tmp, f"lisa{k}")
            os.makedirs(save)
            runs.append(_run(args, k, save))
    result["runs"] = runs
    full, lisa = runs
    print(f"SFT step cost, {args.device}, {args.iters} steps (median after warm-up):")
    for r in runs:
        what = "full fine-tuning" if r["lisa_layers"] == 0 else f"LISA {r['lisa_layers']} layers"
        mem = (f"peak GPU {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"]
               else f"peak RSS {r['peak_rss_gib']:.2f} GiB")  # fmt: skip
        print(f"  {what:18s}: {r['median_step_s'] * 1e3:8.1f} ms/step, "
              f"{r['tokens_per_s']:10,.0f} tokens/s, {mem}")  # fmt: skip
    print(f"  LISA / full: {lisa['tokens_per_s'] / full['tokens_per_s']:.3f}× tokens/s")
    append_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
