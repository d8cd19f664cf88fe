"""The training run: build the model, optimizer, data and components from the configuration,
then the loop (step, log, evaluate, stop or save)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.checkpoint_layout import CheckpointError
from megatron_ext.config import RunConfig
from megatron_ext.data.dataset_info import SIDECAR_SUFFIX
from megatron_ext.data.sampler import build_data_loader
from megatron_ext.metrics_file import METRICS_FILE
from megatron_ext.models.gates import freeze_gates
from megatron_ext.models.gpt import build_model_chunks, build_transformer_config
from megatron_ext.models.params import count_parameters
from megatron_ext.platform.distributed import init_distributed
from megatron_ext.restart_ledger import RestartLedger, RestartRefused
from megatron_ext.training import preflight
from megatron_ext.training.checkpoint_manager import CheckpointManager, lock_save_dir
from megatron_ext.training.collectives import gather, one_line
from megatron_ext.training.components import (
    SETUP,
    Component,
    Components,
    RunContext,
    StepOutcome,
)
from megatron_ext.training.counters import RunCounters
from megatron_ext.training.data_setup import run_datasets
from megatron_ext.training.evaluation import Evaluator
from megatron_ext.training.flops import flops_per_iteration
from megatron_ext.training.lisa import LayerActivation
from megatron_ext.training.metrics import MetricsWriter, StepLogger
from megatron_ext.training.model_setup import wrap_model
from megatron_ext.training.optimizer import build_optimizer
from megatron_ext.training.profiling import IterationProfiler
from megatron_ext.training.resolve import resolve_run
from megatron_ext.training.run_state import RunState
from megatron_ext.training.spikes import SpikeMonitor
from megatron_ext.training.step import train_step
from megatron_ext.training.stopping import StopPolicy, StopReason
from megatron_ext.training.stragglers import StragglerReport
from megatron_ext.training.telemetry import TelemetryHook

logger = logging.getLogger("gpas")


# A component instance, or a function building one from the run's context.
ExtraComponent = Union[Component, Callable[[RunContext], Component]]


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was saved."""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class Trainer:
    """Builds the run from its configuration, then trains; the components
    (``training/components.py``) own their policies: checkpoints, validation, the step log,
    telemetry, profiling, counters, spikes, LISA, stopping."""

    def __init__(self, cfg: RunConfig, components: Sequence[ExtraComponent] = ()):
        """``components``: more components for this run. A :class:`Component` instance is
        registered at once (it sees the setup and checkpoint-load phases); a function of the
        :class:`RunContext` is called with the others and registered before the checkpoint
        manager (for components that need the model)."""
        run = resolve_run(cfg, _world_size())  # the caller's configuration is not changed
        self.cfg, self.eod = run.cfg, run.eod
        self.undescribed_data = list(run.undescribed_data)
        self.train_examples = run.samples_per_epoch
        self.gbs, self.num_micro = run.global_batch_size, run.num_microbatches
        self.state = RunState()
        self._start_recorded = False  # this start is in --save's restart ledger
        self.metrics_path = _metrics_path(self.cfg)
        self.run_dir = os.path.dirname(os.path.abspath(self.metrics_path))
        self.components = Components()
        if self.cfg.faults.hang_timeout is not None:  # first: it watches the setup too
            from megatron_ext.training.hang import HangWatchdog

            rank = int(os.environ.get("RANK", "0"))
            self.components.add(HangWatchdog(
                self.cfg.faults, self.run_dir, rank, self.cfg.parallel.distributed_timeout_minutes
            ))  # fmt: skip
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
            # before anything is written there; quiet through a start as long as collectives allow
            self.lock = lock_save_dir(
                cfg.checkpoint.save, quiet_s=cfg.parallel.distributed_timeout_minutes * 60
            )
            self._build_model_and_optimizer()
            self.checkpoints = CheckpointManager(
                cfg.checkpoint,
                self.model,
                self.optimizer,
                self.scheduler,
                dataclasses.asdict(cfg),
                self.components,
                bf16=cfg.optim.bf16,
                lock=self.lock,
            )
            self.state = self.checkpoints.load()
            self.checkpoints.check_space()  # before anything is written under --save
            self._check_restart()
            self._build_data()
            self._open_metrics()
            self._build_components()
            self.checkpoints.restore_components()
            self._log_setup()
        self.components.on_start(self.state)

    def _check_restart(self) -> None:
        """Collective: record this start in ``--save``'s restart ledger; a restart that would
        not help (the fault repeats, or the attempt before stopped on purpose) is refused on
        every rank."""
        save = self.cfg.checkpoint.save
        if not save:
            return
        refusal = None
        if torch.distributed.get_rank() == 0:
            try:
                RestartLedger(save).check_and_record(self.state.iteration)
            except RestartRefused as err:
                refusal = (str(err), err.exit_code)
        refusal = gather(refusal)[0]  # rank 0's verdict, for every rank
        self._start_recorded = True
        if refusal is not None:
            raise RestartRefused(*refusal)

    def record_stop(self, exit_code: int, reason: str) -> None:
        """The run stopped on purpose: a restart of it is to be refused (rank 0 writes)."""
        save = self.cfg.checkpoint.save
        if save and self._start_recorded:
            if torch.distributed.get_rank() == 0:
                RestartLedger(save).record_stop(exit_code, reason)

    def _build_components(self) -> None:
        """Every training component, from its own configuration section, in the order the loop
        calls them: the telemetry recorder around the step, then the components that judge the
        step (counters, spikes, LISA) before the step logger writes it, the evaluator and the
        stop policy after it, the checkpoint manager last (a save sees everyone's state)."""
        cfg = self.cfg
        ctx = RunContext(
            model=self.model,
            optimizer=self.optimizer,
            metrics=self.metrics,
            phases=self.components,
            speaks=_is_logging_rank(),
            rank=torch.distributed.get_rank(),
            device=cfg.device,
            run_dir=self.run_dir,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.optim.micro_batch_size,
            num_microbatches=self.num_micro,
            global_batch_size=self.gbs,
            train_iters=cfg.optim.train_iters,
        )
        flops = flops_per_iteration(
            cfg.model, self.gbs, cfg.model.seq_length, cfg.model.padded_vocab_size()
        )
        add = self.components.add
        add(TelemetryHook(cfg.logging.telemetry_interval, ctx))
        add(IterationProfiler(cfg.profiling, ctx, say=_say))
        self.counters = add(RunCounters())
        self.spikes = add(SpikeMonitor(cfg.spikes, ctx))
        self.layer_activation = add(
            LayerActivation(cfg.sft, ctx, num_layers=cfg.model.num_layers, seed=cfg.optim.seed)
        )
        if cfg.faults.log_straggler:
            add(StragglerReport(cfg.faults, ctx, cfg.logging.log_interval))
        add(StepLogger(cfg.logging, ctx, flops))
        valid = self._valid_iterators if self.valid_ds is not None else None
        add(Evaluator(cfg.eval, ctx, valid, per_document=cfg.data.data_mode == "per-document"))
        self.stop = add(StopPolicy(cfg.stop))
        for build in self._factories:
            add(build(ctx))
        add(self.checkpoints)

    def _build_model_and_optimizer(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self.tf_config = build_transformer_config(
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
            cfg.model, self.tf_config, seed=o.seed, transformer_impl=cfg.transformer_impl
        )
        if cfg.gates_frozen:
            frozen = sum(freeze_gates(c) for c in chunks)
            if frozen:
                logger.info("froze %d GPAS gates", frozen)
        if cfg.device == "cuda":
            chunks = [c.cuda() for c in chunks]
        self.model = wrap_model(chunks, self.tf_config, cfg.parallel)
        self.optimizer = build_optimizer(
            self.model,
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.resolved_min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                bf16=o.bf16,
                params_dtype=self.tf_config.params_dtype,
                clip_grad=0.0,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            ),
            fused_adam=cfg.device == "cuda" if o.use_fused_adam is None else o.use_fused_adam,
            foreach_grad_norm=o.foreach_grad_norm,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.resolved_min_lr,
            lr_warmup_steps=o.lr_warmup_iters,
            lr_decay_steps=o.resolved_decay_iters,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=o.train_iters,
            wd_incr_style="constant",
        )

    def _log_setup(self) -> None:
        cfg = self.cfg
        if self.train_examples is not None:
            logger.info(
                "--epochs %d: %d training samples per epoch, global batch %d: %d iterations",
                cfg.sft.epochs, self.train_examples, self.gbs, cfg.optim.train_iters,
            )  # fmt: skip
        if self.undescribed_data:
            logger.warning(
                "%s: no %s description (made before sidecars existed): the tokenizer cannot "
                "be checked; token ids are checked batch by batch",
                ", ".join(self.undescribed_data),
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
            self.gbs,
            self.num_micro,
            cfg.optim.micro_batch_size,
        )

    def _build_data(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        train, valid = run_datasets(cfg, self.gbs, self.eod, say=_say)
        self.train_ds, self.valid_ds = train, valid
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        loader = build_data_loader(
            train,
            self.state.consumed_samples,
            o.micro_batch_size,
            dp_rank,
            dp,
            num_workers=cfg.num_workers,
        )
        self.train_iterators = self._per_chunk(self._checked(iter(loader)))
        self._valid_loader_args = (o.micro_batch_size, dp_rank, dp)

    def _per_chunk(self, iterator):
        return list(itertools.tee(iterator, len(self.model))) if len(self.model) > 1 else [iterator]

    def _valid_iterators(self):
        mbs, dp_rank, dp = self._valid_loader_args
        loader = build_data_loader(self.valid_ds, 0, mbs, dp_rank, dp, num_workers=0)
        return self._per_chunk(self._checked(iter(loader)))

    def _checked(self, iterator):
        """Datasets without a sidecar get their token ids checked batch by batch."""
        if not self.undescribed_data:
            return iterator
        return preflight.checked_batches(iterator, self.cfg.model.vocab_size, self.undescribed_data)

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

    # -- loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        """Train to ``--train-iters`` or until the stop policy says otherwise; returns the last
        iteration. Raises :class:`TrainingStopped` after too many non-finite steps."""
        state, components = self.state, self.components
        while state.iteration < self.cfg.optim.train_iters and self.stop.reason is None:
            lr = self.optimizer.param_groups[0]["lr"]
            components.before_step(state.iteration + 1)
            result, seconds = self._train_step(self.layer_activation.frozen)
            state.advance(self.gbs)
            if result.applied:
                self.scheduler.step(increment=1)
            components.after_step(
                StepOutcome(state.iteration, result, lr, seconds, state.consumed_samples)
            )
        components.at_end(state, stopped=self.stop.reason is not None)
        self._report(self.stop.reason)
        return state.iteration

    def _train_step(self, frozen: Optional[set]):
        cfg, o = self.cfg, self.cfg.optim
        t0 = time.perf_counter()
        result = train_step(
            self.train_iterators,
            self.model,
            self.optimizer,
            num_microbatches=self.num_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=o.micro_batch_size,
            clip_grad=o.clip_grad,
            clip_gate_grad=o.clip_gate_grad,
            share_loss=self.spikes.enabled,
            accept_update=self.spikes.accepts if cfg.spikes.skip_spiky_steps else None,
            frozen=frozen,
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

    def close(self) -> None:
        """However the run ends (an input error mid-run included): every component closed (a
        background checkpoint write finished, the ``--save`` lock released), the metrics sinks
        closed."""
        lock = getattr(self, "lock", None)
        try:
            self.components.close()
            if lock is not None:
                lock.release()  # once released, releasing again does nothing
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
    """Set up and train; returns the last iteration. The metrics sinks are closed however the
    run ends (an input error mid-run included)."""
    trainer = Trainer(cfg, components)
    try:
        trainer.setup()
        return trainer.train()
    except (TrainingStopped, CheckpointError) as err:
        trainer.record_stop(3, one_line(err))
        raise
    finally:
        trainer.close()
