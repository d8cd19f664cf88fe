"""Wrap model chunks for training: bf16 (Float16Module) and megatron-core DDP."""

from __future__ import annotations

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

from megatron_ext.config import ParallelConfig


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


def unwrap_model(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
