#!/usr/bin/env python3
"""CPU step time with the no-TE fast path on vs off, measured side by side in one process.

Fast path: SDPA core attention (``--attention-backend auto``) and device-side gradient norms;
off: megatron-core's DotProductAttention and per-parameter norms. (Fused Adam is CUDA-only by
default and not part of the CPU comparison.) The two models share weights and batches; steps
alternate on/off so that machine noise falls on both alike. Prints the median step time of each
and their ratio (the fast path must not slow the CPU step).

    python bench/bench_fast_path.py --model-size small --seq-length 256 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="small")
    p.add_argument("--norm-type", default="pre_gpas")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.enums import AttnBackend

    from megatron_ext.models.gpt import build_model, build_transformer_config
    from megatron_ext.models.presets import model_preset
    from megatron_ext.platform.distributed import ensure_single_process_cpu
    from megatron_ext.training.grad_norm import use_foreach_l2_norm
    from megatron_ext.training.model_setup import wrap_model
    from megatron_ext.training.optimizer import build_optimizer
    from megatron_ext.training.step import train_step

    ensure_single_process_cpu()
    cfg = model_preset(args.model_size, norm_type=args.norm_type, seq_length=args.seq_length)
    runs = {}
    for name, backend in (("fast", AttnBackend.auto), ("local", AttnBackend.local)):
        tc = build_transformer_config(cfg, use_cpu=True, attention_backend=backend)
        model = wrap_model([build_model(cfg, tc, seed=1)], tc)
        opt = build_optimizer(
            model,
            OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=0.0),
            foreach_grad_norm=name == "fast",
        )
        runs[name] = (model, opt)
    gen = torch.Generator().manual_seed(0)
    mbs, seq = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(mbs, seq),
        "position_ids": torch.arange(seq).expand(mbs, -1),
    }
    times: dict = {name: [] for name in runs}
    for step in range(args.steps + 1):
        for name, (model, opt) in runs.items():
            use_foreach_l2_norm(name == "fast")
            t0 = time.perf_counter()
            train_step(
                [iter([batch])], model, opt, num_microbatches=1, seq_length=seq,
                micro_batch_size=mbs, clip_grad=1.0, clip_gate_grad=0.01,
            )  # fmt: skip
            if step:  # the first step of each is a warm-up
                times[name].append(time.perf_counter() - t0)
    fast, local = statistics.median(times["fast"]), statistics.median(times["local"])
    print(
        f"{args.model_size} {args.norm_type}, seq {seq}, micro-batch {mbs}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"fast path (SDPA, foreach norms) : {fast * 1e3:8.1f} ms/step (median of {args.steps})")
    print(f"megatron-core local path        : {local * 1e3:8.1f} ms/step")
    print(f"fast / local                    : {fast / local:.3f}")


if __name__ == "__main__":
    main()
