"""The configuration of a training run: one dataclass per section, each field with its type,
default and help (``fields.py`` says how), validated section by section before anything heavy is
built."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_ext.config.data import DataConfig
from megatron_ext.config.fields import check_choices, option, require
from megatron_ext.config.model import ModelConfig, ParallelConfig

# The names of megatron-core's AttnBackend enum (a unit test keeps them equal), spelled here so
# that the configuration imports neither torch nor megatron-core.
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
LRDecayStyle = Literal["cosine", "linear", "constant", "inverse-square-root", "WSD"]
FP8Format = Literal["hybrid", "e4m3"]
# delayed: per-tensor scales from an amax history; tensorwise: current (just-in-time) scaling.
FP8Recipe = Literal["delayed", "tensorwise"]
FP8AmaxAlgo = Literal["max", "most_recent"]
RecomputeGranularity = Literal["full", "selective"]
RecomputeMethod = Literal["uniform", "block"]
Device = Literal["cuda", "cpu"]
TransformerImpl = Literal["local", "transformer_engine"]
AttentionBackend = Literal[ATTENTION_BACKENDS]
#: tokenizers read from a file (megatron_ext.data.tokenizers builds them)
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
TokenizerType = Literal[("NullTokenizer", *TOKENIZER_TYPES)]
DamagedPolicy = Literal["fallback", "stop"]


@dataclass
class TokenizerConfig:
    tokenizer_type: TokenizerType = option(
        "NullTokenizer",
        "NullTokenizer (with --vocab-size), SentencePieceTokenizer, HuggingFaceTokenizer",
    )
    tokenizer_model: Optional[str] = option(None, "the tokenizer's model file")
    eod_id: Optional[int] = option(None, "end-of-document id (default: the tokenizer's)")
    override_tokenizer_check: bool = option(
        False, "train on data whose description names another tokenizer (a deliberate choice)"
    )


@dataclass
class OptimConfig:
    micro_batch_size: int = option(1, "sequences per rank per forward/backward")
    global_batch_size: Optional[int] = option(None, "default: micro batch × data-parallel size")
    train_iters: int = option(1000, "optimizer steps of the run")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: Optional[float] = option(None, "default: 0.1 × lr (the reference's cosine floor)")
    lr_warmup_iters: int = option(0, "linear warm-up steps")
    lr_decay_iters: Optional[int] = option(None, "default: --train-iters")
    lr_decay_style: LRDecayStyle = option(
        "cosine", "schedule after warm-up: cosine, linear, constant, inverse-square-root or WSD"
    )
    clip_grad: float = option(0.0, "global gradient-norm clip (0: off)")
    clip_gate_grad: float = option(
        0.0, "joint-norm clip of all GPAS gate gradients, after --clip-grad (0: off)"
    )
    weight_decay: float = option(0.0, "AdamW weight decay (not on norms, biases and gates)")
    adam_beta1: float = option(0.9, "AdamW β1")
    adam_beta2: float = option(0.999, "AdamW β2")
    adam_eps: float = option(1e-8, "AdamW ε")
    bf16: bool = option(False, "bf16 mixed precision (fp32 master weights and optimizer state)")
    fp8_format: Optional[FP8Format] = option(
        None, "FP8 GEMMs through Transformer Engine: hybrid (E4M3 fwd, E5M2 bwd) or e4m3"
    )
    fp8_recipe: FP8Recipe = option(
        "delayed", "delayed (scales from the amax history) or tensorwise (current scaling)"
    )
    fp8_amax_history_len: int = option(1024, "delayed scaling: amax history length")
    fp8_amax_compute_algo: FP8AmaxAlgo = option(
        "max", "delayed scaling: max or most_recent of the history"
    )
    fp8_margin: int = option(0, "delayed scaling: margin of the FP8 scale (powers of 2)")
    recompute_granularity: Optional[RecomputeGranularity] = option(
        None, "full (whole layers) or selective (core attention only)"
    )
    recompute_method: Optional[RecomputeMethod] = option(None, "full recompute: uniform or block")
    recompute_num_layers: Optional[int] = option(
        None, "full recompute: layers per block (block) or per group (uniform)"
    )
    seed: int = option(42, "the seed of the init, the data order and dropout")
    freeze_gates: Optional[bool] = option(
        None, "keep the GPAS gates fixed; default: on with --sft, off otherwise"
    )
    use_fused_adam: Optional[bool] = option(
        None, "torch's fused Adam kernel (no TE/Apex); default: on with --device cuda"
    )
    foreach_grad_norm: bool = option(
        True, "gradient norms for clipping without a host sync per parameter (no TE/Apex)"
    )

    def fp8_transformer_config(self) -> dict:
        """TransformerConfig fields of the FP8 settings (empty without --fp8-format)."""
        if self.fp8_format is None:
            return {}
        return {
            "fp8": self.fp8_format,
            "fp8_recipe": self.fp8_recipe,
            "fp8_amax_history_len": self.fp8_amax_history_len,
            "fp8_amax_compute_algo": self.fp8_amax_compute_algo,
            "fp8_margin": self.fp8_margin,
        }

    @property
    def resolved_min_lr(self) -> float:
        return 0.1 * self.lr if self.min_lr is None else self.min_lr

    @property
    def resolved_decay_iters(self) -> int:
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass
class EvalConfig:
    eval_interval: int = option(1000, "validate every this many steps (and at the end)")
    eval_iters: int = option(10, "validation batches per evaluation")
    eval_tokens: Optional[int] = option(
        None, "per-document mode: evaluate on this many non-pad tokens (default 10M)"
    )


@dataclass
class StopConfig:
    """When a run stops before --train-iters (read by the stop policy)."""

    nan_skip_limit: int = option(
        10, "stop (after saving) after this many skipped steps in a row (NaN/Inf, no loss token)"
    )
    exit_interval: Optional[int] = option(None, "save and exit at iterations divisible by this")
    exit_duration_in_mins: Optional[float] = option(
        None, "save and exit once the run has trained this long"
    )


BACKSTOP_SHARE = 0.9  # no hang timeout exceeds this share of the process-group timeout


def timeout_ceiling(distributed_timeout_minutes: float) -> float:
    """The longest hang timeout, set, default or learned: the hang monitor must fire before a
    collective's own timeout (the backstop) ends the run without a stack."""
    return BACKSTOP_SHARE * distributed_timeout_minutes * 60


@dataclass
class FaultConfig:
    """Hangs and slow ranks (read by the hang watchdog and the straggler report)."""

    hang_timeout: Optional[float] = option(
        None,
        "declare a rank hung when it finishes no step and no phase (checkpoint save, "
        "evaluation) for this many seconds (the start has --hang-setup-timeout): its stack is "
        "written under the metrics file's directory, it is stopped, and a launcher with "
        "restarts resumes the run (needs the 'resilience' extra)",
    )
    hang_setup_timeout: Optional[float] = option(
        None,
        "with --hang-timeout: seconds the start of each launch (setup with checkpoint load and "
        "data index build, then the first step) may take before its rank is declared hung "
        "(default: 90% of --distributed-timeout-minutes)",
    )
    calc_ft_timeouts: bool = option(
        False,
        "learn each phase's hang timeout from the run (5× the longest seen, at most 90% of "
        "--distributed-timeout-minutes), kept with the checkpoint; --hang-timeout holds until "
        "there is enough to learn from",
    )
    log_straggler: bool = option(
        False, "every --log-interval, name the rank whose own compute is slowest"
    )
    straggler_threshold: float = option(
        0.2, "a rank slower than the median by more than this fraction is named"
    )


@dataclass
class CheckpointConfig:
    save: Optional[str] = option(None, "the checkpoint directory written to")
    load: Optional[str] = option(
        None, "the checkpoint directory resumed from (its newest intact checkpoint)"
    )
    save_interval: Optional[int] = option(None, "save every this many steps (and at the end)")
    keep_last_checkpoints: Optional[int] = option(
        None, "keep only this many newest checkpoints (default: all)"
    )
    finetune: bool = option(False, "load weights only and start at iteration 0")
    pretrained_checkpoint: Optional[str] = option(
        None,
        "start from these weights (iteration 0) while --load holds no checkpoint yet, resume "
        "from --load once it does (a preempted fine-tuning job continues)",
    )
    async_save: bool = option(
        False, "write checkpoints in a background process while training continues"
    )
    verify_integrity: bool = option(
        True, "SHA-256 of each checkpoint file in its manifest, checked on load (sizes always are)"
    )
    on_damaged_checkpoint: DamagedPolicy = option(
        "fallback",
        "a damaged latest checkpoint: fallback (set it aside, resume from the newest intact "
        "one) or stop",
    )


@dataclass
class SFTConfig:
    """Supervised fine-tuning (the paper's second stage): SFT data, epochs, LISA."""

    sft: bool = option(
        False, "fine-tune on SFT data (--data-mode sft); the GPAS gates are frozen by default"
    )
    epochs: Optional[int] = option(
        None, "train this many passes over the training split (sets --train-iters)"
    )
    lisa_layers: int = option(
        0, "LISA: decoder layers trained at a time, sampled every --lisa-interval steps (0: all)"
    )
    lisa_interval: int = option(20, "LISA: steps between samplings")


@dataclass
class SpikeConfig:
    """Loss and gradient-norm spikes against a rolling window (OLMo-core's rule). Logged and
    counted always; skipped only on request (the paper's runs did not skip)."""

    spike_threshold: float = option(
        6.0,
        "a step whose loss or grad norm is this many standard deviations above the window's "
        "mean is a spike (0: off)",
    )
    spike_window: int = option(128, "steps in the rolling window")
    skip_spiky_steps: bool = option(False, "skip the update of a spiky step, as for NaN/Inf")


@dataclass
class FusionConfig:
    """Fused kernels, under Megatron-LM's flag names and defaults. None means "where it runs":
    SwiGLU and bias-dropout-add fusion (megatron-core's torch.compile'd functions) on CUDA,
    RoPE fusion (a Transformer Engine kernel) with ``--transformer-impl transformer_engine``.
    The CPU path keeps them off by default: compiling costs more than it saves on tiny models.
    Cross-entropy fusion is opt-in as in Megatron-LM, and bf16-only: megatron-core's fused
    kernel rounds the logits' gradient to bf16 whatever the model's precision."""

    bias_swiglu_fusion: Optional[bool] = option(
        None, "fused SwiGLU (torch.compile); default: on with --device cuda"
    )
    bias_dropout_fusion: Optional[bool] = option(
        None, "fused residual add (torch.compile); default: on with --device cuda"
    )
    rope_fusion: Optional[bool] = option(
        None, "Transformer Engine's fused RoPE; default: on with transformer_engine"
    )
    cross_entropy_loss_fusion: bool = option(
        False, "fused cross-entropy (torch.compile; bf16 only); default: off"
    )
    attention_backend: AttentionBackend = option(
        "auto",
        "with --transformer-impl local: auto (PyTorch SDPA) or local (megatron-core's "
        "DotProductAttention); with Transformer Engine any of TE's backends",
    )

    def transformer_config(self, device: str, transformer_impl: str) -> dict:
        """TransformerConfig fields, with the defaults resolved for this device and backend."""
        on_gpu = device == "cuda"

        def pick(value: Optional[bool], default: bool) -> bool:
            return default if value is None else value

        return {
            "bias_activation_fusion": pick(self.bias_swiglu_fusion, on_gpu),
            "bias_dropout_fusion": pick(self.bias_dropout_fusion, on_gpu),
            "apply_rope_fusion": pick(
                self.rope_fusion, on_gpu and transformer_impl == "transformer_engine"
            ),
            "cross_entropy_loss_fusion": self.cross_entropy_loss_fusion,
            "attention_backend": self.attention_backend,  # megatron-core's AttnBackend name
        }


@dataclass
class LoggingConfig:
    log_interval: int = option(10, "one step line and metrics record every this many steps")
    metrics_file: Optional[str] = option(
        None, "JSONL metrics (default: <save or run dir>/metrics.jsonl)"
    )
    tensorboard_dir: Optional[str] = option(
        None, "also write the metrics as TensorBoard events here"
    )
    wandb_project: Optional[str] = option(
        None, "also log the metrics to this Weights & Biases project"
    )
    wandb_exp_name: Optional[str] = option(None, "the W&B run's name (default: W&B's)")
    new_wandb_on_resume: bool = option(
        False, "start a new W&B run on resume instead of continuing the old one"
    )
    telemetry_interval: int = option(
        0, "every N steps log per-layer residual RMS, GPAS scales, grad norms"
    )


@dataclass
class ProfileConfig:
    """A window of profiled iterations, under Megatron-LM's flags and counting: iterations
    ``profile_step_start + 1`` … ``profile_step_end`` (1-based) on ``profile_ranks``."""

    profile: bool = option(
        False,
        "profile iterations --profile-step-start+1 … --profile-step-end on "
        "--profile-ranks: with --use-pytorch-profiler a Chrome trace and a kernel summary, "
        "else cudaProfilerStart/Stop for nsys --capture-range=cudaProfilerApi",
    )
    use_pytorch_profiler: bool = option(False, "--profile with torch.profiler (works on CPU too)")
    profile_step_start: int = option(10, "--profile: the window starts after this step")
    profile_step_end: int = option(12, "--profile: the window's last step")
    profile_ranks: list[int] = option(
        default_factory=lambda: [0], help="global ranks to profile (default: 0)"
    )
    profile_dir: Optional[str] = option(
        None, "where traces go (default: <save or run dir>/profile)"
    )

    def validate(self, device: str, train_iters: int, world_size: int) -> None:
        if not self.profile:
            require(not self.use_pytorch_profiler, "--use-pytorch-profiler", "needs --profile")
            return
        require(self.profile_step_start >= 0, "--profile-step-start", "must be ≥ 0")
        require(
            self.profile_step_end > self.profile_step_start,
            "--profile-step-end",
            f"must be after --profile-step-start {self.profile_step_start}",
        )
        require(
            self.profile_step_end <= train_iters,
            "--profile-step-end",
            f"{self.profile_step_end} is after the last iteration (--train-iters {train_iters})",
        )
        outside = sorted(r for r in self.profile_ranks if not 0 <= r < world_size)
        require(
            not outside,
            "--profile-ranks",
            f"rank(s) {outside} do not exist in a world of {world_size} process(es)",
        )
        require(
            self.use_pytorch_profiler or device == "cuda",
            "--profile",
            "without --use-pytorch-profiler it brackets the window with cudaProfilerStart/Stop "
            "for nsys, which needs --device cuda; add --use-pytorch-profiler",
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    profiling: ProfileConfig = field(default_factory=ProfileConfig)
    device: Device = option("cuda", "cpu runs everything with gloo (CPU emulation)")
    transformer_impl: TransformerImpl = option(
        "local", "local (megatron-core's own modules) or transformer_engine (needed for FP8)"
    )
    num_workers: int = option(2, "data-loader worker processes per rank")

    @property
    def gates_frozen(self) -> bool:
        """--freeze-gates as given, else frozen exactly under --sft."""
        o = self.optim
        return self.sft.sft if o.freeze_gates is None else o.freeze_gates

    def data_parallel_size(self, world_size: int) -> int:
        return self.parallel.data_parallel_size(world_size)

    def global_batch_size(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.optim.global_batch_size or self.optim.micro_batch_size * dp

    def num_microbatches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.global_batch_size(world_size) // (self.optim.micro_batch_size * dp)

    def validate(self, world_size: int) -> RunConfig:
        """Every check of the run, each error naming its flag."""
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.data.validate()
        for section in (self, self.tokenizer, self.optim, self.fusion, self.checkpoint, self.sft):
            check_choices(section)
        _check_batch(self, world_size)
        _check_schedule(self.optim)
        _check_fp8(self)
        _check_runtime(self)
        _check_logging(self.logging, self.eval)
        _check_checkpoint(self.checkpoint)
        _check_stop(self.stop)
        _check_faults(self.faults, self.parallel)
        _check_spikes(self.spikes)
        _check_sft(self)
        _check_fusion(self)
        self.profiling.validate(self.device, self.optim.train_iters, world_size)
        t = self.tokenizer
        require(
            t.tokenizer_type == "NullTokenizer" or t.tokenizer_model is not None,
            "--tokenizer-model",
            f"required with --tokenizer-type {t.tokenizer_type}",
        )
        return self


def _check_batch(cfg: RunConfig, world_size: int) -> None:
    o = cfg.optim
    require(o.micro_batch_size > 0, "--micro-batch-size", "must be positive")
    dp = cfg.data_parallel_size(world_size)
    gbs = cfg.global_batch_size(world_size)
    require(
        gbs % (o.micro_batch_size * dp) == 0,
        "--global-batch-size",
        f"{gbs} is not a multiple of micro batch {o.micro_batch_size} × data-parallel size {dp}",
    )


def _check_schedule(o: OptimConfig) -> None:
    require(o.train_iters > 0, "--train-iters", "must be positive")
    require(o.lr >= 0, "--lr", "must be ≥ 0")
    require(o.resolved_min_lr <= o.lr, "--min-lr", f"{o.resolved_min_lr} exceeds --lr {o.lr}")
    require(
        0 <= o.lr_warmup_iters < o.resolved_decay_iters,
        "--lr-warmup-iters",
        f"must be in [0, --lr-decay-iters={o.resolved_decay_iters}) "
        "(--lr-decay-iters defaults to --train-iters)",
    )
    require(o.clip_grad >= 0, "--clip-grad", "must be ≥ 0 (0 disables)")
    require(o.clip_gate_grad >= 0, "--clip-gate-grad", "must be ≥ 0 (0 disables)")


def _check_fp8(cfg: RunConfig) -> None:
    o = cfg.optim
    require(o.fp8_amax_history_len >= 1, "--fp8-amax-history-len", "must be ≥ 1")
    require(o.fp8_margin >= 0, "--fp8-margin", "must be ≥ 0")
    if o.fp8_format is None:
        return
    _check_fp8_shapes(cfg.model)
    require(
        cfg.transformer_impl == "transformer_engine",
        "--fp8-format",
        "needs --transformer-impl transformer_engine",
    )
    require(cfg.device == "cuda", "--fp8-format", "needs a GPU")
    require(o.bf16, "--fp8-format", "needs --bf16 (FP8 GEMMs, bf16 rest)")


def _check_fp8_shapes(model: ModelConfig) -> None:
    """TE's FP8 GEMMs need every weight dimension divisible by 16."""
    sizes = {"--hidden-size": model.hidden_size, "--ffn-hidden-size": model.ffn_hidden_size}
    off = {flag: size for flag, size in sizes.items() if size % 16}
    fixes = ", ".join(f"{flag} {-(-size // 16) * 16}" for flag, size in off.items())
    require(
        not off, "--fp8-format", f"FP8 GEMMs need sizes divisible by 16, got {off}; e.g. {fixes}"
    )


def _check_runtime(cfg: RunConfig) -> None:
    require(
        not (cfg.device == "cpu" and cfg.transformer_impl == "transformer_engine"),
        "--transformer-impl",
        "Transformer Engine needs --device cuda",
    )


def _check_logging(lg: LoggingConfig, e: EvalConfig) -> None:
    # Logging sinks asked for must be there now, not found missing after an hour.
    require(
        not lg.wandb_project or _installed("wandb"),
        "--wandb-project",
        "W&B logging needs the wandb package: pip install wandb",
    )
    require(
        not lg.tensorboard_dir or _installed("tensorboard"),
        "--tensorboard-dir",
        "TensorBoard logging needs the tensorboard package: pip install tensorboard",
    )
    require(lg.log_interval > 0, "--log-interval", "must be positive")
    require(e.eval_interval > 0, "--eval-interval", "must be positive")
    require(e.eval_iters >= 0, "--eval-iters", "must be ≥ 0")


def _check_stop(s: StopConfig) -> None:
    require(s.nan_skip_limit >= 1, "--nan-skip-limit", "must be ≥ 1")
    require(s.exit_interval is None or s.exit_interval >= 1, "--exit-interval", "must be ≥ 1")


def _check_faults(f: FaultConfig, parallel) -> None:
    require(f.hang_timeout is None or f.hang_timeout > 0, "--hang-timeout", "must be positive")
    require(
        not f.calc_ft_timeouts or f.hang_timeout is not None,
        "--calc-ft-timeouts",
        "needs --hang-timeout (the timeout that holds until one is learned)",
    )
    ceiling = timeout_ceiling(parallel.distributed_timeout_minutes)
    for name, value in (("--hang-timeout", f.hang_timeout), ("--hang-setup-timeout",
                                                              f.hang_setup_timeout)):  # fmt: skip
        if value is None:
            continue
        require(
            value <= ceiling,
            name,
            f"{value:g} s is more than 90% of --distributed-timeout-minutes "
            f"{parallel.distributed_timeout_minutes:g} ({ceiling:g} s; the hang detector must "
            "fire before a collective times out)",
        )
    require(
        f.hang_setup_timeout is None or f.hang_timeout is not None,
        "--hang-setup-timeout",
        "needs --hang-timeout (it times the start of a watched run)",
    )
    require(
        f.hang_setup_timeout is None or f.hang_setup_timeout > 0,
        "--hang-setup-timeout",
        "must be positive",
    )
    require(f.straggler_threshold > 0, "--straggler-threshold", "must be positive")


def _check_checkpoint(c: CheckpointConfig) -> None:
    require(c.save_interval is None or c.save_interval > 0, "--save-interval", "must be positive")
    require(c.save_interval is None or c.save is not None, "--save-interval", "needs --save DIR")
    require(
        c.keep_last_checkpoints is None or c.keep_last_checkpoints >= 1,
        "--keep-last-checkpoints",
        "must be ≥ 1",
    )


def _check_sft(cfg: RunConfig) -> None:
    s = cfg.sft
    require(
        not s.sft or cfg.data.data_mode == "sft" or cfg.data.mock_data,
        "--data-mode",
        f"--sft reads SFT datasets (tools/preprocess_sft.py): use --data-mode sft, not "
        f"{cfg.data.data_mode}",
    )
    require(cfg.data.data_mode != "sft" or s.sft, "--sft", "--data-mode sft is for --sft runs")
    require(s.epochs is None or s.epochs >= 1, "--epochs", "must be at least 1")
    require(
        0 <= s.lisa_layers <= cfg.model.num_layers,
        "--lisa-layers",
        f"must be in [0, {cfg.model.num_layers}] (the model's layers)",
    )
    require(s.lisa_interval >= 1, "--lisa-interval", "must be at least 1")
    lisa = 0 < s.lisa_layers < cfg.model.num_layers
    # LISA switches idle layers' requires_grad off; megatron-core's parameter-gather hook
    # asserts it is on for every parameter it gathers.
    require(
        not (lisa and cfg.parallel.overlap_param_gather),
        "--overlap-param-gather",
        "is not supported with LISA (--lisa-layers); drop it (--overlap-grad-reduce works)",
    )


def _check_spikes(s: SpikeConfig) -> None:
    require(s.spike_threshold >= 0, "--spike-threshold", "must be ≥ 0 (0 turns detection off)")
    require(s.spike_window >= 8, "--spike-window", "must be at least 8 steps")
    require(
        s.spike_threshold > 0 or not s.skip_spiky_steps,
        "--skip-spiky-steps",
        "needs spike detection (--spike-threshold > 0)",
    )


def _check_fusion(cfg: RunConfig) -> None:
    f = cfg.fusion
    require(
        not f.rope_fusion
        or (cfg.device == "cuda" and cfg.transformer_impl == "transformer_engine"),
        "--rope-fusion",
        "is a Transformer Engine kernel: needs --device cuda and "
        "--transformer-impl transformer_engine (or pass --no-rope-fusion)",
    )
    require(
        cfg.transformer_impl == "transformer_engine" or f.attention_backend in ("auto", "local"),
        "--attention-backend",
        "flash, fused and unfused are Transformer Engine's backends; with "
        "--transformer-impl local choose auto (PyTorch SDPA) or local",
    )
    require(
        not f.cross_entropy_loss_fusion or cfg.optim.bf16,
        "--cross-entropy-loss-fusion",
        "rounds the logits' gradient to bf16: use it with --bf16 only",
    )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None
