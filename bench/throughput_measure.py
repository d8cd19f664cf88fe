"""One norm type's training throughput, measured in this process: ``bench_throughput.py``
starts one such process per norm type (so that one model's memory cannot inflate the next one's
peak) with its own flags and the norm type last; the row is the last line printed."""

from __future__ import annotations

import json
import statistics
import time

import torch
from bench_throughput import build_parser, device_name
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
    peak = device_peak_tflops(device_name(args.device))
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
        if v not in (None, False) and k not in ("json", "norm_type", "profile", "norm_types")
    )
    with open(args.profile, "a") as f:
        f.write(f"## {norm_type}: {flags}\n")
        f.write(summarize(device_events(prof, args.device), iterations, wall_ms) + "\n\n")


def main():
    p = build_parser()
    p.add_argument("norm_type")
    args = p.parse_args()
    init_distributed(ParallelConfig(), device=args.device)
    print(json.dumps(measure(args.norm_type, args)))


if __name__ == "__main__":
    main()
