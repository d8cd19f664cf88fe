"""The training run: build the model, optimizer, data and components from the configuration,
then the loop (step, then every component's say on it)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from megatron.core import parallel_state

from megatron_ext.config import RunConfig
from megatron_ext.data.dataset_info import SIDECAR_SUFFIX
from megatron_ext.metrics_file import METRICS_FILE
from megatron_ext.models.params import count_parameters
from megatron_ext.planning.resolve import resolve_run
from megatron_ext.platform.collectives import one_line
from megatron_ext.platform.distributed import init_distributed
from megatron_ext.training.components.checkpointer import Checkpointer
from megatron_ext.training.components.counters import RunCounters
from megatron_ext.training.components.evaluator import Evaluator
from megatron_ext.training.components.hang_watchdog import HangWatchdog
from megatron_ext.training.components.lisa import Lisa
from megatron_ext.training.components.profiler import IterationProfiler
from megatron_ext.training.components.restart_guard import RestartGuard
from megatron_ext.training.components.save_lock import SaveDirLock
from megatron_ext.training.components.spikes import SpikeMonitor
from megatron_ext.training.components.step_logger import StepLogger
from megatron_ext.training.components.stop_policy import StopPolicy
from megatron_ext.training.components.stragglers import StragglerReport
from megatron_ext.training.components.telemetry import TelemetryHook
from megatron_ext.training.contract import (
    SETUP,
    Component,
    Components,
    RunContext,
    StepOutcome,
    StopReason,
    TrainingStopped,
)
from megatron_ext.training.data_setup import RunData
from megatron_ext.training.flops import flops_per_iteration
from megatron_ext.training.metrics import MetricsWriter
from megatron_ext.training.model_setup import build_run_model
from megatron_ext.training.optimizer import build_run_optimizer
from megatron_ext.training.run_state import RunState
from megatron_ext.training.step import IterationResult, train_step

logger = logging.getLogger("gpas")


# A component instance, or a function building one from the run's context.
ExtraComponent = Union[Component, Callable[[RunContext], Component]]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class Trainer:
    """Builds the run from its configuration, then trains; the components
    (``training/components/``) own their policies: checkpoints, validation, the step log,
    telemetry, profiling, counters, spikes, LISA, stopping, the ``--save`` lock and ledger, the
    hang watchdog."""

    def __init__(self, cfg: RunConfig, components: Sequence[ExtraComponent] = ()):
        """``components``: more components for this run. A :class:`Component` instance is
        registered at once (it sees the setup and checkpoint-load phases); a function of the
        :class:`RunContext` is called with the others and registered before the step logger
        (its recorded metrics reach the step record)."""
        self.resolved = resolve_run(cfg, _world_size())  # the caller's configuration is not changed
        self.cfg = cfg = self.resolved.cfg
        self.state = RunState()
        self.metrics_path = _metrics_path(cfg)
        self.run_dir = os.path.dirname(os.path.abspath(self.metrics_path))
        self.components = Components()
        # These see the setup: they are registered before it starts, the lock first (before
        # anything is written under --save, the watchdog's stack files included).
        if cfg.checkpoint.save:
            quiet_s = cfg.parallel.distributed_timeout_minutes * 60  # a start may take as long
            self.components.add(SaveDirLock(cfg.checkpoint.save, quiet_s))
            self.components.add(RestartGuard(cfg.checkpoint.save))
        if cfg.faults.hang_timeout is not None:
            rank = int(os.environ.get("RANK", "0"))
            minutes = cfg.parallel.distributed_timeout_minutes
            self.components.add(HangWatchdog(cfg.faults, self.run_dir, rank, minutes))
        for c in components:
            if isinstance(c, Component):
                self.components.add(c)
        self._factories = [c for c in components if not isinstance(c, Component)]

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        init_distributed(
            cfg.parallel, device=cfg.device, num_layers=cfg.model.num_layers, seed=cfg.optim.seed
        )
        logger.setLevel(logging.INFO if _is_logging_rank() else logging.WARNING)
        with self.components.phase(SETUP):
            self.tf_config, self.model = build_run_model(cfg)
            self.optimizer, self.scheduler = build_run_optimizer(
                cfg, self.model, self.tf_config.params_dtype
            )
            self.checkpointer = Checkpointer(
                cfg.checkpoint,
                self.model,
                self.optimizer,
                self.scheduler,
                dataclasses.asdict(cfg),
                self.components,
                bf16=cfg.optim.bf16,
            )
            self.state = self.checkpointer.load()
            self.data = RunData(
                self.resolved, self.state.consumed_samples, len(self.model), say=_say
            )
            self._open_metrics()
            self._build_components()
            self.checkpointer.restore_components()
            self._log_setup()
        self.components.on_start(self.state)

    def _build_components(self) -> None:
        """Every training component, from its own configuration section, in the order the loop
        calls them: the telemetry recorder around the step, then the components that judge the
        step and record metrics (counters, spikes, LISA, stragglers, the run's extras) before the
        step logger writes them, the evaluator and the stop policy after it, the checkpointer
        last (a save sees everyone's state)."""
        cfg, run = self.cfg, self.resolved
        ctx = RunContext(
            model=self.model,
            optimizer=self.optimizer,
            metrics=self.metrics,
            phases=self.components,
            is_logging_rank=_is_logging_rank(),
            rank=torch.distributed.get_rank(),
            device=cfg.device,
            run_dir=self.run_dir,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.optim.micro_batch_size,
            num_microbatches=run.num_microbatches,
            global_batch_size=run.global_batch_size,
            train_iters=cfg.optim.train_iters,
        )
        flops = flops_per_iteration(
            cfg.model, run.global_batch_size, cfg.model.seq_length, cfg.model.padded_vocab_size()
        )
        add = self.components.add
        add(TelemetryHook(cfg.logging.telemetry_interval, ctx))
        add(IterationProfiler(cfg.profiling, ctx, say=_say))
        add(RunCounters())
        add(SpikeMonitor(cfg.spikes, ctx))
        add(Lisa(cfg.sft, ctx, num_layers=cfg.model.num_layers, seed=cfg.optim.seed))
        if cfg.faults.log_straggler:
            add(StragglerReport(cfg.faults, ctx, cfg.logging.log_interval))
        for build in self._factories:
            add(build(ctx))
        add(StepLogger(cfg.logging, ctx, flops))
        per_document = cfg.data.data_mode == "per-document"
        add(Evaluator(cfg.eval, ctx, self.data.validation, per_document=per_document))
        add(StopPolicy(cfg.stop))
        add(self.checkpointer)

    def _open_metrics(self) -> None:
        cfg, path = self.cfg, self.metrics_path
        resumed = self.state.iteration > 0
        run_id = None if cfg.logging.new_wandb_on_resume or not resumed else self.state.wandb_run_id
        self.metrics = MetricsWriter(
            path,
            _is_logging_rank(),
            tensorboard_dir=cfg.logging.tensorboard_dir,
            wandb_project=cfg.logging.wandb_project,
            wandb_name=cfg.logging.wandb_exp_name,
            wandb_run_id=run_id,
            config=dataclasses.asdict(cfg),
        )
        self.state.wandb_run_id = self.metrics.wandb_run_id
        if _is_logging_rank():
            logger.info("metrics: %s", os.path.abspath(path))

    def _log_setup(self) -> None:
        cfg, run = self.cfg, self.resolved
        if run.samples_per_epoch is not None:
            logger.info(
                "--epochs %d: %d training samples per epoch, global batch %d: %d iterations",
                cfg.sft.epochs, run.samples_per_epoch, run.global_batch_size, cfg.optim.train_iters,
            )  # fmt: skip
        if run.undescribed_data:
            logger.warning(
                "%s: no %s description (made before sidecars existed): the tokenizer cannot "
                "be checked; token ids are checked batch by batch",
                ", ".join(run.undescribed_data),
                SIDECAR_SUFFIX,
            )
        logger.info(
            "model: %s, %d layers, %s",
            cfg.model.norm_type,
            cfg.model.num_layers,
            count_parameters(cfg.model),
        )
        logger.info(
            "layout: TP=%d PP=%d DP=%d, global batch %d = %d micro-batches × %d × DP",
            cfg.parallel.tensor_model_parallel_size,
            cfg.parallel.pipeline_model_parallel_size,
            parallel_state.get_data_parallel_world_size(),
            run.global_batch_size,
            run.num_microbatches,
            cfg.optim.micro_batch_size,
        )

    # -- loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        """Train to ``--train-iters`` or until a component asks to stop; returns the last
        iteration. Raises :class:`TrainingStopped` when the stop is a failure."""
        state, components = self.state, self.components
        while state.iteration < self.cfg.optim.train_iters and not components.stop_requested():
            lr = self.optimizer.param_groups[0]["lr"]
            components.before_step(state.iteration + 1)
            result, seconds = self._train_step()
            state.advance(self.resolved.global_batch_size)
            if result.applied:
                self.scheduler.step(increment=1)
            components.after_step(
                StepOutcome(state.iteration, result, lr, seconds, state.consumed_samples)
            )
        reason = components.stop_requested()
        components.at_end(state, stopped=reason is not None)
        self._report(reason)
        return state.iteration

    def _train_step(self) -> tuple[IterationResult, float]:
        cfg, o = self.cfg, self.cfg.optim
        t0 = time.perf_counter()
        result = train_step(
            self.data.train,
            self.model,
            self.optimizer,
            num_microbatches=self.resolved.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=o.micro_batch_size,
            clip_grad=o.clip_grad,
            clip_gate_grad=o.clip_gate_grad,
            may_apply_update=self.components.may_apply_update,
            frozen=self.components.frozen_parameters(),
        )
        return result, time.perf_counter() - t0

    def _report(self, reason: Optional[StopReason]) -> None:
        if reason is None:
            return
        if reason.non_finite:
            save = self.cfg.checkpoint.save
            raise TrainingStopped(
                f"stopped at iteration {self.state.iteration}: {reason.message}; the last good "
                "state was saved" + (f" under {save}" if save else " (no --save given)")
            )
        logger.info("exiting at iteration %d: %s", self.state.iteration, reason.message)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        """``with Trainer(cfg) as trainer:`` ends the run as :func:`run` does: every component
        hears of an error that ends it, then it is closed."""
        try:
            if error is not None:
                self._hear_error(error)
        finally:
            self.close()

    def _hear_error(self, error: BaseException) -> None:
        try:
            self.components.on_error(error)
        except Exception as hook_error:  # noqa: BLE001 - the run's own error is the one raised
            logger.error("while ending on an error: %s", one_line(hook_error))

    def close(self) -> None:
        """However the run ends (an input error mid-run included): every component closed (a
        background checkpoint write finished, the ``--save`` lock released), the metrics sinks
        closed."""
        try:
            self.components.close()
        finally:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.close()


def _metrics_path(cfg: RunConfig) -> str:
    """The metrics file; its directory is the run directory (profiles, stacks)."""
    return cfg.logging.metrics_file or os.path.join(
        cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), METRICS_FILE
    )


def _say(message: Optional[str]) -> None:
    """A line from whichever rank has it (the logger speaks on the logging rank only)."""
    if message:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run(cfg: RunConfig, components: Sequence[ExtraComponent] = ()) -> int:
    """Set up and train; returns the last iteration. Every component hears of an error that
    ends the run, and the run is closed however it ends."""
    with Trainer(cfg, components) as trainer:
        trainer.setup()
        return trainer.train()
