"""Wrap model chunks for training: bf16 (Float16Module) and megatron-core DDP."""

from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig


def wrap_model(
    chunks,
    config: TransformerConfig,
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    grad_reduce_in_fp32: bool = True,
) -> list[DistributedDataParallel]:
    """Float16Module (when ``config.bf16``) then DDP around each chunk; wires grad finalization."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
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
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def unwrap_model(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
