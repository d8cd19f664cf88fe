"""The step line and the step record: what the run says about its steps every
``--log-interval`` iterations."""

from __future__ import annotations

import dataclasses
import logging

import torch

from megatron_ext.config import LoggingConfig
from megatron_ext.metrics_file import StepRecord
from megatron_ext.models.gates import gate_scale_summary
from megatron_ext.models.gpt import unwrap_model
from megatron_ext.training.contract import Component, RunContext, StepOutcome
from megatron_ext.training.flops import device_peak_tflops
from megatron_ext.training.model_setup import sync_params

logger = logging.getLogger("gpas")

_RECORD_FIELDS = {f.name for f in dataclasses.fields(StepRecord)}


class StepLogger(Component):
    """One line and one metrics record every ``--log-interval`` iterations; rates are over the
    interval (step times summed since the last line). Register it after the components that
    record metrics (the counters, the spike monitor): the record carries the latest value each
    recorded since the last record."""

    def __init__(self, cfg: LoggingConfig, ctx: RunContext, flops_per_step: float):
        self.cfg, self.ctx = cfg, ctx
        self.flops = flops_per_step
        cuda = ctx.device == "cuda"
        self.peak = device_peak_tflops(torch.cuda.get_device_name()) if cuda else None
        self._seconds, self._steps = 0.0, 0
        self._recorded: dict = {}

    def after_step(self, step: StepOutcome) -> None:
        self._seconds += step.seconds
        self._steps += 1
        self._recorded.update(step.metrics)
        if step.iteration % self.cfg.log_interval:
            return
        ctx, result = self.ctx, step.result
        sync_params(ctx.model)  # the line reads the gates
        seconds = self._seconds / self._steps
        recorded, self._recorded = self._recorded, {}
        self._seconds, self._steps = 0.0, 0
        own = dict(
            iteration=step.iteration,
            consumed_samples=step.consumed_samples,
            lm_loss=result.loss,
            lr=step.lr,
            grad_norm=result.grad_norm,
            gate_grad_norm=result.gate_grad_norm,
            tokens_per_s=ctx.global_batch_size * ctx.seq_length / seconds,
            step_time_s=seconds,
            **gate_scale_summary([unwrap_model(c) for c in ctx.model]),
        )
        # recorded values fill the record's fields of that name; the rest follow them
        fields = {k: v for k, v in recorded.items() if k in _RECORD_FIELDS and k not in own}
        extra = {k: v for k, v in recorded.items() if k not in _RECORD_FIELDS}
        record = StepRecord(**own, **fields)
        if ctx.device == "cuda":
            world = torch.distributed.get_world_size()
            record.tflops = self.flops / seconds / 1e12 / world
            record.mfu = record.tflops / self.peak if self.peak else None
            record.mem_gib = torch.cuda.max_memory_allocated() / 2**30
        values = {**record.as_dict(), **extra}
        ctx.metrics.write(values)
        if ctx.is_logging_rank:
            logger.info(format_step_line(values, ctx.train_iters))


def format_step_line(r: dict, train_iters: int) -> str:
    parts = [
        f"iter {r['iteration']:>7}/{train_iters}",
        f"loss {r['lm_loss']:.4f}" if r.get("lm_loss") is not None else "loss -",
        f"lr {r['lr']:.3e}",
        f"grad {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad -",
    ]
    if r.get("gate_scale_mean") is not None:
        parts.append(
            f"gpas c {r['gate_scale_mean']:.4f} [{r['gate_scale_min']:.4f}, "
            f"{r['gate_scale_max']:.4f}]"
        )
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{r['step_time_s'] * 1e3:.0f} ms/it")
    if r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.1f} TFLOP/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("mem_gib") is not None:
        parts.append(f"mem {r['mem_gib']:.1f} GiB")
    if r.get("skipped_iterations"):
        parts.append(f"skipped {r['skipped_iterations']}")
    if r.get("no_loss_iterations"):
        parts.append(f"{r['no_loss_iterations']} with no loss token")
    return " | ".join(parts)
