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
import statistics
import time

import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_ext.config import FusionConfig, OptimConfig, ParallelConfig
from megatron_ext.models.gpt import build_model_chunks, build_transformer_config
from megatron_ext.models.params import count_parameters
from megatron_ext.models.presets import model_preset
from megatron_ext.platform.distributed import init_distributed
from megatron_ext.training.flops import device_peak_tflops, flops_per_iteration
from megatron_ext.training.kernel_profile import device_events, summarize
from megatron_ext.training.model_setup import wrap_model
from megatron_ext.training.optimizer import build_optimizer
from megatron_ext.training.step import train_step


def _batches(cfg, mbs, n, seq, device):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=gen)
        out.append(
            dict(
                tokens=tokens[:, :-1].to(device),
                labels=tokens[:, 1:].to(device),
                loss_mask=torch.ones(mbs, seq, device=device),
                position_ids=torch.arange(seq, device=device).expand(mbs, -1),
            )
        )
    return out


def _build(norm_type, args):
    """(model config, wrapped model chunks, optimizer) as a training run builds them."""
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    if args.ffn_hidden_size:
        overrides["ffn_hidden_size"] = args.ffn_hidden_size
    cfg = model_preset(
        args.model_size, norm_type=norm_type, seq_length=args.seq_length, **overrides
    )
    fusion = {
        "auto": FusionConfig(),
        "off": FusionConfig(False, False, False, False),
        "all": FusionConfig(cross_entropy_loss_fusion=True),
    }[args.fusion]
    fast = args.fast_path == "on"
    # the no-TE fast path: SDPA attention, device-side grad norms, fused Adam (on CUDA)
    fusion.attention_backend = "auto" if fast else "local"
    tc = build_transformer_config(
        cfg,
        bf16=True,
        recompute_granularity="full" if args.recompute else None,
        recompute_method="uniform" if args.recompute else None,
        recompute_num_layers=1 if args.recompute else None,
        **OptimConfig(
            bf16=True, fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe
        ).fp8_transformer_config(),
        **fusion.transformer_config(args.device, args.transformer_impl),
    )
    chunks = build_model_chunks(cfg, tc, transformer_impl=args.transformer_impl)
    model = wrap_model([c.to(args.device) for c in chunks], tc)
    opt = build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.0,
            bf16=True,
            params_dtype=torch.bfloat16,
            clip_grad=0.0,
        ),
        fused_adam=fast and args.device == "cuda",
        foreach_grad_norm=fast,
    )
    return cfg, model, opt


def measure(norm_type, args):
    cfg, model, opt = _build(norm_type, args)
    data = _batches(cfg, args.micro_batch_size, args.num_microbatches, args.seq_length, "cuda")
    on_gpu = args.device == "cuda"

    def iteration():
        return train_step(
            [iter(data)],
            model,
            opt,
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            clip_grad=1.0,
            clip_gate_grad=0.01,
        )

    times = []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = iteration()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    gbs = args.micro_batch_size * args.num_microbatches
    flops = flops_per_iteration(cfg, gbs, args.seq_length, cfg.padded_vocab_size())
    peak = device_peak_tflops(_device_name(args.device))
    row = {
        "norm_type": norm_type,
        "params_M": round(count_parameters(cfg).total / 1e6, 1),
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "iter_ms": round(t * 1e3, 2),
        "tokens_per_s": round(gbs * args.seq_length / t),
        "tflops": round(flops / t / 1e12, 1),
        "mfu": round(flops / t / 1e12 / peak, 4) if peak else None,
        "max_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "loss": round(result.loss, 4),
    }
    if args.profile:
        _profile(iteration, norm_type, args)
    return row


def _profile(iteration, norm_type, args, iterations: int = 2):
    """Append a kernel breakdown of ``iterations`` more iterations to ``args.profile``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iterations):
            iteration()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iterations
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v not in (None, False) and k not in ("json", "single", "profile", "norm_types")
    )
    with open(args.profile, "a") as f:
        f.write(f"## {norm_type}: {flags}\n")
        f.write(summarize(device_events(prof, args.device), iterations, wall_ms) + "\n\n")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _measure_in_fresh_process(norm_type, args):
    """Each norm type in its own process, so one model's memory cannot inflate the next peak."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--single", norm_type]
    for key, value in vars(args).items():
        if key in ("json", "single", "norm_types") or value is None or value is False:
            continue
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
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
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        init_distributed(ParallelConfig(), device=args.device)
        print(json.dumps(measure(args.single, args)))
        return
    header = {
        "date": datetime.date.today().isoformat(),
        "device": _device_name(args.device),
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
