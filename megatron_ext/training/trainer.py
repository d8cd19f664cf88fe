"""The training loop: setup, iterations, logging, evaluation, checkpoints, clean exits."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.config import ConfigError
from megatron_ext.data.dataset_info import SIDECAR_SUFFIX
from megatron_ext.data.datasets import build_datasets
from megatron_ext.data.sampler import build_data_loader
from megatron_ext.data.tokenizers import TokenizerError, build_tokenizer
from megatron_ext.models.gates import freeze_gates, gate_values
from megatron_ext.models.gpt import build_model_chunks, build_transformer_config
from megatron_ext.models.params import count_parameters
from megatron_ext.platform.distributed import init_distributed
from megatron_ext.training import checkpointing, preflight, telemetry
from megatron_ext.training.evaluation import evaluate
from megatron_ext.training.flops import device_peak_tflops, flops_per_iteration
from megatron_ext.training.metrics import MetricsWriter, format_step_line
from megatron_ext.training.model_setup import sync_params, unwrap_model, wrap_model
from megatron_ext.training.optimizer import build_optimizer
from megatron_ext.training.profiling import IterationProfiler
from megatron_ext.training.run_config import RunConfig
from megatron_ext.training.signals import ExitSignalHandler
from megatron_ext.training.step import train_step

logger = logging.getLogger("gpas")

DEFAULT_EVAL_TOKENS = 10_000_000  # the reference's per-document validation budget


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was saved."""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _vocab_and_eod(cfg: RunConfig) -> tuple[int, int]:
    t = cfg.tokenizer
    if t.tokenizer_type == "NullTokenizer":
        # Megatron's null tokenizer: ids < vocab_size, EOD = vocab_size (hence one more row).
        return cfg.model.vocab_size + 1, t.eod_id if t.eod_id is not None else cfg.model.vocab_size
    try:
        tok = build_tokenizer(t.tokenizer_type, t.tokenizer_model, t.eod_id)
    except TokenizerError as err:
        raise ConfigError(f"{err}; check the flag") from err
    if tok.eod is None:
        raise ConfigError(
            f"--eod-id: tokenizer {t.tokenizer_model} has no end-of-document token; pass --eod-id N"
        )
    return tok.vocab_size, tok.eod


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.world_size = _world_size()
        cfg.validate(self.world_size)
        vocab, self.eod = _vocab_and_eod(cfg)
        cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab)
        cfg.model.validate()
        # Files against flags, before anything is built or written.
        self.undescribed_data = preflight.check_run(cfg, self.eod)
        self.gbs = cfg.global_batch_size(self.world_size)
        self.num_micro = cfg.num_microbatches(self.world_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        init_distributed(
            cfg.parallel, device=cfg.device, num_layers=cfg.model.num_layers, seed=cfg.optim.seed
        )
        # Our log lines on the logging rank; megatron-core's own INFO chatter (bucket listings,
        # dataset configs) only as warnings.
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
        )
        logger.setLevel(logging.INFO if _is_logging_rank() else logging.WARNING)
        o = cfg.optim
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
        if o.freeze_gates:
            frozen = sum(freeze_gates(c) for c in chunks)
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
        run_state = None
        c = cfg.checkpoint
        if c.load:
            run_state = checkpointing.load_checkpoint(
                c.load, self.model, self.optimizer, self.scheduler, load_optimizer=not c.finetune
            )
            if run_state is None:
                logger.info("--load %s holds no checkpoint yet; starting from scratch", c.load)
        if run_state and not c.finetune:
            self.iteration = run_state["iteration"]
            self.consumed_samples = run_state["consumed_samples"]
            self.skipped_total = run_state.get("skipped_total", 0)
            logger.info(
                "resumed from iteration %d (%d samples consumed)",
                self.iteration,
                self.consumed_samples,
            )
        self._build_data()
        if self.undescribed_data:
            logger.warning(
                "%s: no %s description (made before sidecars existed): the tokenizer cannot "
                "be checked; token ids are checked batch by batch",
                ", ".join(self.undescribed_data),
                SIDECAR_SUFFIX,
            )
        self._open_metrics(run_state)
        count = count_parameters(cfg.model)
        logger.info(
            "model: %s, %d layers, %s",
            cfg.model.norm_type,
            cfg.model.num_layers,
            count,
        )
        logger.info(
            "layout: TP=%d PP=%d DP=%d, global batch %d = %d micro-batches × %d × DP",
            cfg.parallel.tensor_model_parallel_size,
            cfg.parallel.pipeline_model_parallel_size,
            parallel_state.get_data_parallel_world_size(),
            self.gbs,
            self.num_micro,
            o.micro_batch_size,
        )

    def _build_data(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        evals = o.train_iters // cfg.eval.eval_interval + 1
        per_doc = cfg.data.data_mode == "per-document"
        valid_samples = None if per_doc else evals * cfg.eval.eval_iters * self.gbs
        train, valid, _ = build_datasets(
            cfg.data,
            seq_length=cfg.model.seq_length,
            seed=o.seed,
            vocab_size=cfg.model.vocab_size,
            eod_id=self.eod,
            num_samples=[o.train_iters * self.gbs, valid_samples, 0],
            is_built_on_rank=lambda: True,
        )
        self.train_ds, self.valid_ds = train, valid
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        loader = build_data_loader(
            train,
            self.consumed_samples,
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

    def _open_metrics(self, run_state) -> None:
        cfg = self.cfg
        path = cfg.logging.metrics_file or os.path.join(
            cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")),
            "metrics.jsonl",
        )
        run_id = (
            None
            if cfg.logging.new_wandb_on_resume or not run_state
            else run_state.get("wandb_run_id")
        )
        self.metrics = MetricsWriter(
            path,
            _is_logging_rank(),
            tensorboard_dir=cfg.logging.tensorboard_dir,
            wandb_project=cfg.logging.wandb_project,
            wandb_name=cfg.logging.wandb_exp_name,
            wandb_run_id=run_id,
            config=_config_dict(cfg),
        )
        self.run_dir = os.path.dirname(os.path.abspath(path))
        if _is_logging_rank():
            logger.info("metrics: %s", os.path.abspath(path))

    # -- loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, o = self.cfg, self.cfg.optim
        start = time.time()
        flops = flops_per_iteration(
            cfg.model,
            self.gbs,
            cfg.model.seq_length,
            cfg.model.padded_vocab_size(),
        )
        peak = device_peak_tflops(torch.cuda.get_device_name()) if cfg.device == "cuda" else None
        window = {"time": 0.0, "iters": 0}
        exit_reason = None
        profiler = self._profiler()
        with ExitSignalHandler() as signals:
            while self.iteration < o.train_iters:
                record_telemetry = (
                    cfg.logging.telemetry_interval > 0
                    and (self.iteration + 1) % cfg.logging.telemetry_interval == 0
                )
                recorder = telemetry.ResidualRecorder() if record_telemetry else None
                if recorder is not None:
                    telemetry.attach(self.model, recorder)
                lr = self.optimizer.param_groups[0]["lr"]
                profiler.before_iteration(self.iteration)
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
                )
                step_time = time.perf_counter() - t0
                if recorder is not None:
                    telemetry.detach(self.model)
                    sync_params(self.model)
                    rows = telemetry.collect(self.model, recorder)
                    self.metrics.write({"iteration": self.iteration + 1, "telemetry": rows})
                self.iteration += 1
                _say(profiler.after_iteration(self.iteration))
                self.consumed_samples += self.gbs
                self._account(result)
                window["time"] += step_time
                window["iters"] += 1
                if self.iteration % cfg.logging.log_interval == 0:
                    sync_params(self.model)  # the log line reads the gates
                    self._log(result, lr, window, flops, peak)
                    window = {"time": 0.0, "iters": 0}
                if self.iteration % cfg.eval.eval_interval == 0:
                    self._evaluate()
                if self.skipped_in_a_row >= o.nan_skip_limit:
                    exit_reason = "nan"
                    break
                exit_reason = self._exit_reason(signals, start)
                if exit_reason:
                    break
                if (
                    cfg.checkpoint.save_interval
                    and self.iteration % cfg.checkpoint.save_interval == 0
                ):
                    self._save()
        _say(profiler.close())
        if exit_reason is None and self.iteration % cfg.eval.eval_interval != 0:
            self._evaluate()
        if cfg.checkpoint.save and (
            exit_reason is not None
            or not cfg.checkpoint.save_interval
            or self.iteration % cfg.checkpoint.save_interval != 0
        ):
            self._save()
        self.metrics.close()
        if exit_reason == "nan":
            raise TrainingStopped(
                f"stopped at iteration {self.iteration}: {self.skipped_in_a_row} iterations in a "
                "row had a non-finite loss or gradient norm (--nan-skip-limit); the last good "
                "state was saved"
                + (f" under {cfg.checkpoint.save}" if cfg.checkpoint.save else " (no --save given)")
            )
        if exit_reason:
            logger.info("exiting at iteration %d: %s", self.iteration, exit_reason)
        return self.iteration

    def _profiler(self) -> IterationProfiler:
        profiler = IterationProfiler(
            self.cfg.profiling,
            torch.distributed.get_rank(),
            self.cfg.device,
            os.path.join(self.run_dir, "profile"),
        )
        _say(profiler.resume_at(self.iteration))
        return profiler

    def _account(self, result) -> None:
        finite = result.update_successful and result.loss_is_finite
        if finite:
            self.scheduler.step(increment=1)
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            logger.warning(
                "iteration %d skipped: non-finite loss or gradient norm (%d in a row)",
                self.iteration,
                self.skipped_in_a_row,
            )
        self.last_result = result

    def _exit_reason(self, signals, start) -> Optional[str]:
        c = self.cfg.checkpoint
        over_time = (
            c.exit_duration_in_mins is not None
            and (time.time() - start) / 60.0 >= c.exit_duration_in_mins
        )
        if signals.agreed(extra=over_time):
            return signals.received and f"signal {signals.received}" or "time limit reached"
        if c.exit_interval and self.iteration % c.exit_interval == 0:
            return f"--exit-interval {c.exit_interval}"
        return None

    def _log(self, result, lr, window, flops, peak) -> None:
        gates = self._gate_summary()
        seconds = window["time"] / max(window["iters"], 1)
        record = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "lm_loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "gate_grad_norm": result.gate_grad_norm,
            "tokens_per_s": self.gbs * self.cfg.model.seq_length / seconds,
            "step_time_s": seconds,
            "skipped_iterations": self.skipped_total,
            **gates,
        }
        if self.cfg.device == "cuda":
            tflops = flops / seconds / 1e12 / self.world_size
            record.update(
                tflops=tflops,
                mfu=tflops / peak if peak else None,
                mem_gib=torch.cuda.max_memory_allocated() / 2**30,
            )
        self.metrics.write(record)
        if _is_logging_rank():
            logger.info(format_step_line(record, self.cfg.optim.train_iters))

    def _gate_summary(self) -> dict:
        values = {}
        for chunk in self.model:
            values.update(gate_values(unwrap_model(chunk)))
        if torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, values)
            for v in gathered:
                values.update(v)
        if not values:
            return {}
        scales = [values[k]["scale"] for k in sorted(values)]
        return {
            "gate_scale_mean": sum(scales) / len(scales),
            "gate_scale_min": min(scales),
            "gate_scale_max": max(scales),
            "gpas_scales": scales,
        }

    def _evaluate(self) -> None:
        cfg = self.cfg
        if self.valid_ds is None or cfg.eval.eval_iters == 0:
            return
        per_doc = cfg.data.data_mode == "per-document"
        budget = (cfg.eval.eval_tokens or DEFAULT_EVAL_TOKENS) if per_doc else cfg.eval.eval_tokens
        result = evaluate(
            self._valid_iterators,
            self.model,
            num_microbatches=self.num_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.optim.micro_batch_size,
            max_batches=None if per_doc else cfg.eval.eval_iters,
            token_budget=budget,
        )
        record = {
            "iteration": self.iteration,
            "val_loss": result.loss,
            "val_ppl": result.ppl,
            "val_tokens": result.tokens,
            "val_batches": result.batches,
        }
        self.metrics.write(record)
        if _is_logging_rank() and result.loss is not None:
            logger.info(
                "validation at iteration %d | loss %.4f | ppl %.3f | %d tokens",
                self.iteration,
                result.loss,
                result.ppl,
                result.tokens,
            )

    def _save(self) -> None:
        c = self.cfg.checkpoint
        if not c.save:
            return
        t0 = time.perf_counter()
        sync_params(self.model)
        state = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_total": self.skipped_total,
            "config": _config_dict(self.cfg),
            "wandb_run_id": self.metrics.wandb_run_id,
        }
        path = checkpointing.save_checkpoint(
            c.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            c.keep_last_checkpoints,
        )
        logger.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - t0)


def _say(message: Optional[str]) -> None:
    """A line from whichever rank has it (the logger speaks on the logging rank only)."""
    if message:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def run(cfg: RunConfig) -> int:
    """Set up and train; returns the last iteration. The metrics sinks are closed however the
    run ends (an input error mid-run included)."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        metrics = getattr(trainer, "metrics", None)
        if metrics is not None:
            metrics.close()
