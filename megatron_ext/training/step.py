"""One training iteration through megatron-core's pipeline schedules."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.platform.collectives import collective_device
from megatron_ext.training.model_setup import mark_frozen_ready
from megatron_ext.training.optimizer import optimizer_step


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses over non-pad tokens, and their count.

    Returned as megatron-core's 3-tuple; the schedule divides by the count (a mean over non-pad
    tokens per micro-batch, as the reference) and by the number of micro-batches.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron-core forward-step contract: returns (output, loss_func)."""
    batch = {k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    return output, partial(masked_token_loss, batch["loss_mask"])


@dataclass
class IterationResult:
    # mean of per-micro-batch token means, averaged over DP; the same on every rank
    loss: Optional[float]
    grad_norm: Optional[float]
    gate_grad_norm: Optional[float]
    update_successful: bool
    num_tokens: int  # tokens that carry loss, over the global batch (every rank knows it)
    rejected: bool = False  # a component refused the update (may_apply_update)
    # seconds from the step's start until this rank reached its gradient reduction: its own
    # forward and backward, before it waits for the data-parallel peers
    compute_seconds: Optional[float] = None

    @property
    def no_loss_tokens(self) -> bool:
        """No token of the global batch carried loss (e.g. SFT examples whose responses fall
        past the sequence): there was nothing to learn, the update was skipped, and the loss is
        undefined (None), not 0."""
        return self.num_tokens == 0

    @property
    def loss_is_finite(self) -> bool:
        return self.loss is None or math.isfinite(self.loss)

    @property
    def applied(self) -> bool:
        """The update happened and the loss was finite (the LR schedule advances)."""
        return self.update_successful and self.loss_is_finite

    @property
    def non_finite(self) -> bool:
        """The update was skipped for a NaN/Inf loss or gradient norm."""
        return not self.rejected and not self.no_loss_tokens and not self.applied


def _reduce_loss(loss_reports: Sequence[dict]) -> tuple[Optional[float], int]:
    """Average of per-micro-batch means over micro-batches and DP (None off the last stage)."""
    if not loss_reports:
        return None, 0
    means = torch.stack([r["lm loss"][0] / r["lm loss"][1].clamp(min=1) for r in loss_reports])
    tokens = torch.stack([r["lm loss"][1] for r in loss_reports]).sum()
    stats = torch.stack([means.mean(), tokens])
    dp = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(stats, group=dp)
    stats[0] /= torch.distributed.get_world_size(group=dp)
    loss, tokens = stats.tolist()  # one read of the device: it waits for the backward pass
    return loss, int(tokens)


def _run_schedule(
    data_iterators, model, num_microbatches, seq_length, micro_batch_size, forward_only
):
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    data_iterators,
    model,
    optimizer,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    clip_grad: float = 0.0,
    clip_gate_grad: float = 0.0,
    may_apply_update: Optional[Callable[[Optional[float], float], bool]] = None,
    frozen: Optional[set] = None,
) -> IterationResult:
    """Forward/backward over ``num_microbatches``, then one optimizer update.

    ``data_iterators`` holds one iterator per model chunk (virtual pipeline stage). Every
    pipeline stage gets the loss (it travels with the token count the stages share anyway).
    ``may_apply_update(loss, grad_norm)`` may refuse the update, and must answer alike on every
    rank; parameters in ``frozen`` are not updated.
    """
    started = time.perf_counter()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    mark_frozen_ready(model, frozen)
    reports = _run_schedule(
        data_iterators, model, num_microbatches, seq_length, micro_batch_size, forward_only=False
    )
    compute = _compute_seconds(model, started)
    loss, tokens = _reduce_loss(reports if parallel_state.is_pipeline_last_stage() else [])
    loss, tokens = _from_last_stage(loss, tokens)
    tokens = int(tokens)
    if tokens == 0:  # the same on every rank: nothing to learn from, so no update
        return IterationResult(None, None, None, False, 0, compute_seconds=compute)
    accept = None if may_apply_update is None else partial(may_apply_update, loss)
    step = optimizer_step(
        optimizer, clip_grad=clip_grad, clip_gate_grad=clip_gate_grad, accept=accept, frozen=frozen
    )
    return IterationResult(
        loss, step.grad_norm, step.gate_grad_norm, step.success, tokens, step.rejected, compute
    )


def _compute_seconds(model, started: float) -> Optional[float]:
    """When this rank's ``TimedFinalize`` (``model_setup.py``) was entered, after ``started``."""
    config = getattr(model[0], "config", None)
    entered = getattr(getattr(config, "finalize_model_grads_func", None), "entered_at", None)
    return entered - started if entered is not None and entered >= started else None


@torch.no_grad()
def evaluate_loss(
    data_iterators,
    model,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    with_tokens: bool = False,
):
    """Forward-only pass; the loss as in :func:`train_step` (None off the last pipeline stage).

    With ``with_tokens`` returns (loss, non-pad tokens across data-parallel ranks), the count
    broadcast to every pipeline stage so that all ranks share one stopping rule."""
    for chunk in model:
        chunk.eval()
    try:
        reports = _run_schedule(
            data_iterators, model, num_microbatches, seq_length, micro_batch_size, forward_only=True
        )
    finally:
        for chunk in model:
            chunk.train()
    loss, tokens = _reduce_loss(reports if parallel_state.is_pipeline_last_stage() else [])
    if not with_tokens:
        return loss
    return loss, int(_from_last_stage(tokens)[0])


def _from_last_stage(*values: Optional[float]) -> tuple:
    """Numbers from the last pipeline stage, broadcast to all stages in one message (float64,
    exact for counts; what other stages pass, None included, is a placeholder)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    t = torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64,
                     device=collective_device())  # fmt: skip
    group = parallel_state.get_pipeline_model_parallel_group()
    last = torch.distributed.get_global_rank(group, torch.distributed.get_world_size(group) - 1)
    torch.distributed.broadcast(t, src=last, group=group)
    return tuple(t.tolist())
