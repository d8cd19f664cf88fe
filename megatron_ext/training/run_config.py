"""The configuration of a training run: dataclasses, validated in one place before heavy work."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from megatron.core.transformer.enums import AttnBackend

from megatron_ext.config import ConfigError, ModelConfig, ParallelConfig
from megatron_ext.data.datasets import DataConfig

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
FP8_FORMATS = ("hybrid", "e4m3")
# delayed: per-tensor scales from an amax history; tensorwise: current (just-in-time) scaling.
FP8_RECIPES = ("delayed", "tensorwise")
FP8_AMAX_ALGOS = ("max", "most_recent")
DEVICES = ("cuda", "cpu")
ATTENTION_BACKENDS = tuple(b.name for b in AttnBackend)


@dataclass
class TokenizerConfig:
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    eod_id: Optional[int] = None
    # Train on data whose sidecar names another tokenizer (a deliberate choice).
    override_tokenizer_check: bool = False


@dataclass
class OptimConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro batch × data parallel size
    train_iters: int = 1000
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: 0.1 × lr (the reference's cosine floor)
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "cosine"
    clip_grad: float = 0.0
    clip_gate_grad: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    fp8_format: Optional[str] = None  # None: no FP8
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    seed: int = 42
    freeze_gates: bool = False
    nan_skip_limit: int = 10
    # torch's fused Adam kernel where megatron-core uses torch's optimizer (no TE/Apex);
    # None: on with --device cuda.
    use_fused_adam: Optional[bool] = None
    # gradient norms for clipping without a host sync per parameter (no TE/Apex)
    foreach_grad_norm: bool = True

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
    eval_interval: int = 1000
    eval_iters: int = 10
    # per-document mode: evaluate until this many non-pad tokens (the reference's protocol)
    eval_tokens: Optional[int] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last_checkpoints: Optional[int] = None
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    finetune: bool = False  # load weights only


@dataclass
class FusionConfig:
    """Fused kernels, under Megatron-LM's flag names and defaults. None means "where it runs":
    SwiGLU and bias-dropout-add fusion (megatron-core's torch.compile'd functions) on CUDA,
    RoPE fusion (a Transformer Engine kernel) with ``--transformer-impl transformer_engine``.
    The CPU path keeps them off by default: compiling costs more than it saves on tiny models.
    Cross-entropy fusion is opt-in as in Megatron-LM, and bf16-only: megatron-core's fused
    kernel rounds the logits' gradient to bf16 whatever the model's precision."""

    bias_swiglu_fusion: Optional[bool] = None
    bias_dropout_fusion: Optional[bool] = None
    rope_fusion: Optional[bool] = None
    cross_entropy_loss_fusion: bool = False
    # Megatron-LM's flag. With --transformer-impl local: auto = PyTorch's fused SDPA, local =
    # megatron-core's DotProductAttention; with Transformer Engine any of TE's backends.
    attention_backend: str = "auto"

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
            "attention_backend": AttnBackend[self.attention_backend],
        }


@dataclass
class LoggingConfig:
    log_interval: int = 10
    metrics_file: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    new_wandb_on_resume: bool = False
    telemetry_interval: int = 0


@dataclass
class ProfileConfig:
    """A window of profiled iterations, under Megatron-LM's flags and counting: iterations
    ``profile_step_start + 1`` … ``profile_step_end`` (1-based) on ``profile_ranks``."""

    profile: bool = False
    use_pytorch_profiler: bool = False  # else: cudaProfilerStart/Stop around the window (nsys)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    profile_dir: Optional[str] = None  # None: <save or run dir>/profile

    def validate(self, device: str, train_iters: int, world_size: int) -> None:
        if not self.profile:
            _req(not self.use_pytorch_profiler, "--use-pytorch-profiler", "needs --profile")
            return
        _req(self.profile_step_start >= 0, "--profile-step-start", "must be ≥ 0")
        _req(
            self.profile_step_end > self.profile_step_start,
            "--profile-step-end",
            f"must be after --profile-step-start {self.profile_step_start}",
        )
        _req(
            self.profile_step_end <= train_iters,
            "--profile-step-end",
            f"{self.profile_step_end} is after the last iteration (--train-iters {train_iters})",
        )
        outside = sorted(r for r in self.profile_ranks if not 0 <= r < world_size)
        _req(
            not outside,
            "--profile-ranks",
            f"rank(s) {outside} do not exist in a world of {world_size} process(es)",
        )
        _req(
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    profiling: ProfileConfig = field(default_factory=ProfileConfig)
    device: str = "cuda"
    transformer_impl: str = "local"
    num_workers: int = 2

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
        o, e, c, lg = self.optim, self.eval, self.checkpoint, self.logging
        _req(self.device in DEVICES, "--device", f"choose one of {DEVICES}")
        _req(o.micro_batch_size > 0, "--micro-batch-size", "must be positive")
        dp = self.data_parallel_size(world_size)
        gbs = self.global_batch_size(world_size)
        _req(
            gbs % (o.micro_batch_size * dp) == 0,
            "--global-batch-size",
            f"{gbs} is not a multiple of micro batch {o.micro_batch_size} × data-parallel "
            f"size {dp}",
        )
        _req(o.train_iters > 0, "--train-iters", "must be positive")
        _req(o.lr >= 0, "--lr", "must be ≥ 0")
        _req(o.resolved_min_lr <= o.lr, "--min-lr", f"{o.resolved_min_lr} exceeds --lr {o.lr}")
        _req(
            0 <= o.lr_warmup_iters < o.resolved_decay_iters,
            "--lr-warmup-iters",
            f"must be in [0, --lr-decay-iters={o.resolved_decay_iters}) "
            "(--lr-decay-iters defaults to --train-iters)",
        )
        _req(
            o.lr_decay_style in LR_DECAY_STYLES,
            "--lr-decay-style",
            f"choose one of {LR_DECAY_STYLES}",
        )
        _req(o.clip_grad >= 0, "--clip-grad", "must be ≥ 0 (0 disables)")
        _req(o.clip_gate_grad >= 0, "--clip-gate-grad", "must be ≥ 0 (0 disables)")
        _req(o.fp8_format in (None, *FP8_FORMATS), "--fp8-format", f"choose one of {FP8_FORMATS}")
        _req(o.fp8_recipe in FP8_RECIPES, "--fp8-recipe", f"choose one of {FP8_RECIPES}")
        if o.fp8_format is not None:
            _req_fp8_shapes(self.model)
        _req(
            o.fp8_amax_compute_algo in FP8_AMAX_ALGOS,
            "--fp8-amax-compute-algo",
            f"choose one of {FP8_AMAX_ALGOS}",
        )
        _req(o.fp8_amax_history_len >= 1, "--fp8-amax-history-len", "must be ≥ 1")
        _req(o.fp8_margin >= 0, "--fp8-margin", "must be ≥ 0")
        _req(
            o.fp8_format is None or self.transformer_impl == "transformer_engine",
            "--fp8-format",
            "needs --transformer-impl transformer_engine",
        )
        _req(o.fp8_format is None or self.device == "cuda", "--fp8-format", "needs a GPU")
        _req(o.fp8_format is None or o.bf16, "--fp8-format", "needs --bf16 (FP8 GEMMs, bf16 rest)")
        _req(
            o.recompute_granularity in (None, "full", "selective"),
            "--recompute-granularity",
            "choose full or selective",
        )
        _req(o.nan_skip_limit >= 1, "--nan-skip-limit", "must be ≥ 1")
        # Logging sinks asked for must be there now, not found missing after an hour.
        _req(
            not lg.wandb_project or _installed("wandb"),
            "--wandb-project",
            "W&B logging needs the wandb package: pip install wandb",
        )
        _req(
            not lg.tensorboard_dir or _installed("tensorboard"),
            "--tensorboard-dir",
            "TensorBoard logging needs the tensorboard package: pip install tensorboard",
        )
        _req(e.eval_interval > 0, "--eval-interval", "must be positive")
        _req(e.eval_iters >= 0, "--eval-iters", "must be ≥ 0")
        _req(lg.log_interval > 0, "--log-interval", "must be positive")
        _req(c.save_interval is None or c.save_interval > 0, "--save-interval", "must be positive")
        _req(c.save_interval is None or c.save is not None, "--save-interval", "needs --save DIR")
        _req(
            c.keep_last_checkpoints is None or c.keep_last_checkpoints >= 1,
            "--keep-last-checkpoints",
            "must be ≥ 1",
        )
        _req(
            self.transformer_impl in ("local", "transformer_engine"),
            "--transformer-impl",
            "choose local or transformer_engine",
        )
        _req(
            not (self.device == "cpu" and self.transformer_impl == "transformer_engine"),
            "--transformer-impl",
            "Transformer Engine needs --device cuda",
        )
        _req(
            not self.fusion.rope_fusion
            or (self.device == "cuda" and self.transformer_impl == "transformer_engine"),
            "--rope-fusion",
            "is a Transformer Engine kernel: needs --device cuda and "
            "--transformer-impl transformer_engine (or pass --no-rope-fusion)",
        )
        _req(
            self.fusion.attention_backend in ATTENTION_BACKENDS,
            "--attention-backend",
            f"choose one of {ATTENTION_BACKENDS}",
        )
        _req(
            self.transformer_impl == "transformer_engine"
            or self.fusion.attention_backend in ("auto", "local"),
            "--attention-backend",
            "flash, fused and unfused are Transformer Engine's backends; with "
            "--transformer-impl local choose auto (PyTorch SDPA) or local",
        )
        _req(
            not self.fusion.cross_entropy_loss_fusion or o.bf16,
            "--cross-entropy-loss-fusion",
            "rounds the logits' gradient to bf16: use it with --bf16 only",
        )
        self.profiling.validate(self.device, o.train_iters, world_size)
        t = self.tokenizer
        _req(
            t.tokenizer_type == "NullTokenizer" or t.tokenizer_model is not None,
            "--tokenizer-model",
            f"required with --tokenizer-type {t.tokenizer_type}",
        )
        return self


def _req_fp8_shapes(model: ModelConfig) -> None:
    """TE's FP8 GEMMs need every weight dimension divisible by 16."""
    sizes = {"--hidden-size": model.hidden_size, "--ffn-hidden-size": model.ffn_hidden_size}
    off = {flag: size for flag, size in sizes.items() if size % 16}
    fixes = ", ".join(f"{flag} {-(-size // 16) * 16}" for flag, size in off.items())
    _req(
        not off,
        "--fp8-format",
        f"FP8 GEMMs need sizes divisible by 16, got {off}; e.g. {fixes}",
    )


def _req(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{flag}: {message}")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None
