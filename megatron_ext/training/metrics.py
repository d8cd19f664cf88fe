"""Run telemetry sinks: one console line per log interval, a JSONL metrics file (always),
W&B (when installed; offline without credentials) and TensorBoard (optional)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import torch

from megatron_ext.config import LoggingConfig
from megatron_ext.metrics_file import StepRecord
from megatron_ext.models.gates import gate_scale_summary
from megatron_ext.training.components import Component, RunContext, StepOutcome
from megatron_ext.training.flops import device_peak_tflops
from megatron_ext.training.model_setup import sync_params, unwrap_model

logger = logging.getLogger("gpas")


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8").read()


class MetricsWriter:
    """Writes metrics on the logging rank only; other ranks get a no-op writer."""

    def __init__(
        self,
        path: str,
        enabled: bool,
        *,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        wandb_name: Optional[str] = None,
        wandb_run_id: Optional[str] = None,
        config: Optional[dict] = None,
    ):
        self.enabled = enabled
        self.path = path
        self.wandb_run_id = wandb_run_id
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if _ends_mid_line(path):  # a run killed while writing: its cut line stays on its own
            self._file.write("\n")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError as err:  # RunConfig.validate refuses this before training
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
                ) from err
        if wandb_project:
            self._start_wandb(wandb_project, wandb_name, wandb_run_id, config)

    def _start_wandb(self, project, name, run_id, config) -> None:
        try:
            import wandb
        except ImportError as err:  # RunConfig.validate refuses this before training
            raise RuntimeError(
                "--wandb-project needs the wandb package: pip install wandb"
            ) from err
        mode = "online" if _wandb_credentials() else "offline"
        run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            mode=mode,
            dir=os.path.dirname(os.path.abspath(self.path)),  # W&B's files beside the metrics
        )
        self.wandb_run_id = run.id
        self._wandb = run
        where = (
            f"; upload with: wandb sync {run.dir.rsplit('/files', 1)[0]}"
            if mode == "offline"
            else ""
        )
        verb = "resumed" if run_id else "started"
        logger.info("W&B run %s %s (%s)%s", run.id, verb, mode, where)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        step = record.get("iteration")
        scalars = {
            k: v
            for k, v in _flatten(record).items()
            if isinstance(v, (int, float)) and k not in ("iteration", "time")
        }
        if self._tb is not None and step is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink (again: nothing)."""
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None


def _ends_mid_line(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class StepLogger(Component):
    """One line and one metrics record every ``--log-interval`` iterations; rates are over the
    interval (step times summed since the last line). Register it after the components that
    add to a step's report (the counters, the spike monitor)."""

    def __init__(self, cfg: LoggingConfig, ctx: RunContext, flops_per_step: float):
        self.cfg, self.ctx = cfg, ctx
        self.flops = flops_per_step
        cuda = ctx.device == "cuda"
        self.peak = device_peak_tflops(torch.cuda.get_device_name()) if cuda else None
        self._seconds, self._steps = 0.0, 0

    def after_step(self, step: StepOutcome) -> None:
        self._seconds += step.seconds
        self._steps += 1
        if step.iteration % self.cfg.log_interval:
            return
        ctx, result = self.ctx, step.result
        sync_params(ctx.model)  # the line reads the gates
        seconds = self._seconds / self._steps
        self._seconds, self._steps = 0.0, 0
        record = StepRecord(
            iteration=step.iteration,
            consumed_samples=step.consumed_samples,
            lm_loss=result.loss,
            lr=step.lr,
            grad_norm=result.grad_norm,
            gate_grad_norm=result.gate_grad_norm,
            tokens_per_s=ctx.global_batch_size * ctx.seq_length / seconds,
            step_time_s=seconds,
            skipped_iterations=step.report.get("skipped_iterations", 0),
            spikes_total=step.report.get("spikes_total"),
            no_loss_iterations=step.report.get("no_loss_iterations"),
            **gate_scale_summary([unwrap_model(c) for c in ctx.model]),
        )
        if ctx.device == "cuda":
            world = torch.distributed.get_world_size()
            record.tflops = self.flops / seconds / 1e12 / world
            record.mfu = record.tflops / self.peak if self.peak else None
            record.mem_gib = torch.cuda.max_memory_allocated() / 2**30
        values = record.as_dict()
        ctx.metrics.write(values)
        if ctx.speaks:
            logger.info(format_step_line(values, ctx.train_iters))


def _flatten(record: dict, prefix: str = "") -> dict:
    """Scalars for TensorBoard/W&B: nested dicts as ``a/b``; per-layer lists as
    ``name/layer_01`` (numbers, e.g. the GPAS scales) or ``name/layer_01/field`` (telemetry
    rows, keyed by their ``layer``)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    layer = item.get("layer", i)
                    rest = {k: v for k, v in item.items() if k != "layer"}
                    out.update(_flatten(rest, f"{name}/layer_{layer + 1:02d}/"))
                else:
                    out[f"{name}/layer_{i + 1:02d}"] = item
        else:
            out[name] = value
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


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
