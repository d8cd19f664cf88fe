"""Helpers shared by the multi-process tests: launch ranks, build a layout, train a few steps."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_ext.platform.distributed import free_port


def _entry(rank, world_size, port, fn, args, result_dir):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(*args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(fn, world_size: int, args, tmp_path) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; return each rank's result."""
    result_dir = str(tmp_path / f"ranks_{fn.__name__}_{free_port()}")
    os.makedirs(result_dir)
    try:
        mp.start_processes(
            _entry,
            args=(world_size, free_port(), fn, args, result_dir),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except Exception as err:
        errors = [
            open(os.path.join(result_dir, f)).read()
            for f in sorted(os.listdir(result_dir))
            if f.endswith(".err")
        ]
        raise AssertionError("rank failed:\n" + "\n".join(errors)) from err
    return [
        torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
        for r in range(world_size)
    ]


def synthetic_batches(
    seed: int,
    num_batches: int,
    global_batch: int,
    seq_length: int,
    vocab: int,
    pad_fraction: float = 0.2,
):
    """Deterministic global batches with right padding (loss mask 0 on pads)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        tokens = torch.randint(0, vocab, (global_batch, seq_length + 1), generator=gen)
        lengths = torch.randint(
            int(seq_length * (1 - pad_fraction)), seq_length + 1, (global_batch,), generator=gen
        )
        mask = (torch.arange(seq_length)[None, :] < lengths[:, None]).float()
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                loss_mask=mask,
            )
        )
    return batches


def micro_batches(global_batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int):
    """Split a global batch into this DP rank's micro-batches (contiguous slice per rank)."""
    n = global_batch["tokens"].shape[0]
    per_rank = n // dp_size
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch_size):
        mb = {k: v[start : start + micro_batch_size] for k, v in global_batch.items()}
        seq = mb["tokens"].shape[1]
        mb["position_ids"] = torch.arange(seq).unsqueeze(0).expand(micro_batch_size, -1)
        out.append(mb)
    return out


# --- layouts ---------------------------------------------------------------------------------

PARITY_STEPS = 3
GLOBAL_BATCH = 4
MICRO_BATCH = 1


def set_gates(chunks, values) -> None:
    """Set layer l's GPAS gate to ``values[l % len(values)]`` (global layer index)."""
    import torch

    with torch.no_grad():
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                if getattr(layer, "gpas_gate", None) is not None:
                    layer.gpas_gate.fill_(values[(layer.layer_number - 1) % len(values)])


def train_layout(
    layout: dict,
    norm_types,
    ckpt_root=None,
    steps: int = PARITY_STEPS,
    initial_gates=None,
    export_root=None,
):
    """Train each norm type ``steps`` iterations under ``layout`` from the same seeded init.

    Returns {norm_type: {"losses": [...], "eval_loss": float}} (losses from the last pipeline
    stage). With ``ckpt_root`` the trained weights are saved to ``ckpt_root/<norm_type>``; with
    ``export_root`` as a weights-only checkpoint with its run configuration (what the Hugging
    Face export reads) to ``export_root/<norm_type>``. ``initial_gates`` moves the gates away
    from 0 before training.
    """
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig

    from megatron_ext.config import ParallelConfig
    from megatron_ext.models.gpt import build_model_chunks, build_transformer_config
    from megatron_ext.models.presets import model_preset
    from megatron_ext.platform.distributed import init_distributed
    from megatron_ext.training.checkpointing import save_checkpoint, save_model
    from megatron_ext.training.model_setup import sync_params, wrap_model
    from megatron_ext.training.optimizer import build_optimizer
    from megatron_ext.training.step import evaluate_loss, train_step

    parallel = ParallelConfig(**layout)
    init_distributed(parallel, device="cpu", num_layers=4, seed=1234)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    num_micro = GLOBAL_BATCH // (dp_size * MICRO_BATCH)
    results = {}
    for norm_type in norm_types:
        cfg = model_preset("tiny4", norm_type=norm_type)
        tc = build_transformer_config(cfg, parallel, use_cpu=True)
        chunks = build_model_chunks(cfg, tc, seed=99)
        if initial_gates is not None:
            set_gates(chunks, initial_gates)
        model = wrap_model(chunks, tc, parallel)
        optimizer = build_optimizer(
            model,
            OptimizerConfig(
                optimizer="adam",
                lr=3e-3,
                min_lr=0.0,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=0.999,
                adam_eps=1e-8,
                clip_grad=0.0,
                use_distributed_optimizer=parallel.use_distributed_optimizer,
            ),
        )
        # One training batch, seen every step (so the loss must fall), and one held-out batch.
        train_batch, eval_batch = synthetic_batches(
            seed=5,
            num_batches=2,
            global_batch=GLOBAL_BATCH,
            seq_length=cfg.seq_length,
            vocab=cfg.vocab_size,
        )
        losses = []
        for _ in range(steps):
            mbs = micro_batches(train_batch, dp_rank, dp_size, MICRO_BATCH)
            result = train_step(
                [iter(mbs) for _ in model],
                model,
                optimizer,
                num_microbatches=num_micro,
                seq_length=cfg.seq_length,
                micro_batch_size=MICRO_BATCH,
                clip_grad=1.0,
                clip_gate_grad=0.01,
            )
            losses.append(result.loss)
        mbs = micro_batches(eval_batch, dp_rank, dp_size, MICRO_BATCH)
        eval_loss = evaluate_loss(
            [iter(mbs) for _ in model],
            model,
            num_microbatches=num_micro,
            seq_length=cfg.seq_length,
            micro_batch_size=MICRO_BATCH,
        )
        sync_params(model)  # the last step's parameters, on every rank
        if ckpt_root is not None:
            save_model(model, os.path.join(ckpt_root, norm_type))
        if export_root is not None:
            run_state = {"iteration": steps, "config": {"model": dataclasses.asdict(cfg)}}
            save_checkpoint(
                os.path.join(export_root, norm_type), steps, model, None, None, run_state
            )
        results[norm_type] = {"losses": losses, "eval_loss": eval_loss}
    return results


def run_cli(argv: list) -> int:
    """Run pretrain_gpas.py's main in this (spawned) rank."""
    import pretrain_gpas

    return pretrain_gpas.main(list(argv))
