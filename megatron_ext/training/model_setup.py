"""The run's model for training: its chunks built, bf16 (Float16Module) and megatron-core DDP
around them, and the data-parallel reduction's bookkeeping for parameters a step leaves
untouched."""

from __future__ import annotations

import logging
import time
from typing import Optional

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import ParallelConfig, RunConfig
from megatron_ext.models.gates import freeze_gates
from megatron_ext.models.gpt import build_model_chunks, build_transformer_config

logger = logging.getLogger("gpas")


def build_run_model(cfg: RunConfig) -> tuple[TransformerConfig, list[DistributedDataParallel]]:
    """(transformer config, wrapped model chunks) of a run: GPAS gates frozen where the run asks
    (fine-tuning), on the run's device, wrapped for its data-parallel layout."""
    o = cfg.optim
    tf_config = build_transformer_config(
        cfg.model,
        cfg.parallel,
        bf16=o.bf16,
        use_cpu=cfg.device == "cpu",
        recompute_granularity=o.recompute_granularity,
        recompute_method=o.recompute_method,
        recompute_num_layers=o.recompute_num_layers,
        **o.fp8_transformer_config(),
        **cfg.fusion.transformer_config(cfg.device, cfg.transformer_impl),
    )
    chunks = build_model_chunks(
        cfg.model, tf_config, seed=o.seed, transformer_impl=cfg.transformer_impl
    )
    if cfg.gates_frozen:
        frozen = sum(freeze_gates(c) for c in chunks)
        if frozen:
            logger.info("froze %d GPAS gates", frozen)
    if cfg.device == "cuda":
        chunks = [c.cuda() for c in chunks]
    return tf_config, wrap_model(chunks, tf_config, cfg.parallel)


class TimedFinalize:
    """megatron-core's ``finalize_model_grads``, noting when this rank reached it: the end of
    its own compute for the step (from here its gradient reduction waits for the other ranks),
    which the straggler report compares across ranks."""

    def __init__(self) -> None:
        self.entered_at: Optional[float] = None

    def __call__(self, *args, **kwargs):
        self.entered_at = time.perf_counter()
        return finalize_model_grads(*args, **kwargs)


def wrap_model(
    chunks,
    config: TransformerConfig,
    parallel: Optional[ParallelConfig] = None,
    *,
    grad_reduce_in_fp32: bool = True,
) -> list[DistributedDataParallel]:
    """Float16Module (when ``config.bf16``) then DDP around each chunk, with the data-parallel
    settings of ``parallel`` (default: none of them); wires grad finalization and, with
    ``--overlap-grad-reduce``, the schedule's hooks that hold the bucket reductions back until
    the last micro-batch's backward (Megatron-LM's wiring)."""
    parallel = parallel or ParallelConfig()
    overlap_grad_reduce = parallel.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if (config.bf16 or config.fp16) else chunk
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=module,
                # Only the first chunk's buckets overlap with compute (Megatron-LM's rule).
                disable_bucketing=i > 0,
            )
        )
    config.finalize_model_grads_func = TimedFinalize()
    if overlap_grad_reduce:
        sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = sync if len(sync) > 1 else sync[0]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # Pipelining: each chunk starts its reduction when its own last backward is done.
            starts = [chunk.start_grad_sync for chunk in wrapped]
            config.grad_sync_func = starts if len(starts) > 1 else starts[0]
    return wrapped


def sync_params(model) -> None:
    """Make every rank's model parameters current after an optimizer step.

    With ``overlap_param_gather`` the distributed optimizer leaves the parameters other ranks
    own stale until the next forward gathers them; whatever reads parameters between a step and
    that forward (checkpoints, logged gate values) calls this first. A no-op otherwise; the next
    forward then finds the gathers done and issues none.
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def mark_frozen_ready(chunks, frozen: Optional[set]) -> None:
    """Under ``--overlap-grad-reduce``, count parameters that will get no gradient this step as
    ready for the data-parallel reduction (megatron-core launches a bucket's reduction once
    every parameter in it reported; a frozen one never would). Call after the grad buffers are
    zeroed, before the forward-backward. Only where the backward hooks drive the reduction:
    pipeline stages after the first, and interleaved chunks, reduce from the schedule instead."""
    if not frozen or not _reduction_follows_hooks(chunks):
        return
    for chunk in chunks:
        if not getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False):
            continue
        groups = chunk.param_to_bucket_group
        for p in frozen:
            group = groups.get(p)
            if group is not None:
                group.register_grad_ready(p)


def _reduction_follows_hooks(chunks) -> bool:
    """megatron-core's 1F1B schedule lets the hooks launch the reduction on the first pipeline
    stage only (the others call ``grad_sync_func`` at the end); its interleaved schedule never."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return True
    return len(chunks) == 1 and parallel_state.get_pipeline_model_parallel_rank() == 0
