"""The model's architecture and its parallel layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_ext.config.fields import check_choices, option, require
from megatron_ext.variants import NORM_TYPE_NAMES, NORM_TYPES, LayerStyle, LNSMode, default_post_num

NormTypeName = Literal[NORM_TYPE_NAMES]
LNSModeName = Literal[tuple(m.value for m in LNSMode)]


@dataclass
class ModelConfig:
    """Shape, architecture and init of a Llama-style GPAS model (spec §1, §3, §4)."""

    norm_type: NormTypeName = option("pre_gpas", "architecture (the 11 of the paper's grid)",
                                     unknown="norm type")  # fmt: skip
    num_layers: int = option(12, "decoder layers L")
    hidden_size: int = option(512, "model width")
    num_attention_heads: int = option(8, "attention heads")
    num_query_groups: Optional[int] = option(None, "grouped-query attention (default: MHA)")
    ffn_hidden_size: int = option(1368, "SwiGLU inner width")
    vocab_size: int = option(
        32000, "vocabulary of --mock-data and the null tokenizer (a real tokenizer sets its own)"
    )
    make_vocab_size_divisible_by: int = option(
        128,
        "pad the embedding rows to a multiple of this (independent of TP, so every "
        "layout computes the same loss)",
    )
    seq_length: int = option(256, "tokens per sample")
    max_position_embeddings: Optional[int] = option(None, "default: --seq-length")
    rotary_base: int = option(10000, "RoPE base θ")
    layernorm_epsilon: float = option(1e-6, "RMSNorm ε")
    post_num: Optional[int] = option(
        None, "Mix-LN: number of leading Post-LN layers (default num_layers // 4)"
    )
    lns_mode: LNSModeName = option(
        LNSMode.GAMMA.value,
        "LayerNorm-Scaling form: gamma (reference, learnable γ init) or fixed",
        unknown="LNS form",
    )
    deepnorm_init_for_gpas: bool = option(
        False, "the DeepNorm init for deeppost_gpas too (the reference gives it only α)"
    )
    init_method_std: float = option(0.02, "σ of the normal init of the linear layers")
    embedding_init_std: float = option(
        math.sqrt(0.4), "σ of the embedding init (the reference's √0.4)"
    )
    scaled_output_init: bool = option(
        False, "output projections at σ/√(2L) (Megatron's), not σ (the reference's)"
    )
    untie_embeddings_and_output_weights: bool = option(
        True, "a separate output layer (the reference's); --no-… ties it to the embedding"
    )
    gate_init: float = option(0.0, "initial value of every GPAS gate g (c = 1 − SiLU(g))")

    @property
    def row(self):
        return NORM_TYPES[self.norm_type]

    @property
    def resolved_post_num(self) -> Optional[int]:
        if self.row.style is not LayerStyle.MIX:
            return None
        return default_post_num(self.num_layers) if self.post_num is None else self.post_num

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM (which pads to a multiple of 128 × TP), the padding does not depend
        on the tensor-parallel size, so the padded logits — and the loss — are the same under
        every layout and a checkpoint resumes exactly under another TP size.
        """
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self) -> ModelConfig:
        check_choices(self)
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads",
        )
        require(
            self.num_attention_heads % self.query_groups == 0,
            "num_query_groups",
            f"{self.num_attention_heads} heads are not divisible into {self.query_groups} groups",
        )
        require(
            self.max_positions >= self.seq_length,
            "max_position_embeddings",
            f"{self.max_positions} is shorter than --seq-length {self.seq_length}",
        )
        require(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be positive")
        require(self.init_method_std > 0, "init_method_std", "must be positive")
        require(self.embedding_init_std > 0, "embedding_init_std", "must be positive")
        if self.post_num is not None:
            require(
                self.row.style is LayerStyle.MIX,
                "post_num",
                "only applies to the Mix-LN types (post_pre, post_pre_gpas), "
                f"not {self.norm_type!r}",
            )
            require(
                0 <= self.post_num <= self.num_layers,
                "post_num",
                f"must be in [0, {self.num_layers}] for {self.num_layers} layers, "
                f"got {self.post_num}",
            )
        return self


#: Model fields that define the architecture: a resumed or fine-tuned run must share them with
#: its checkpoint, and an imported model is rebuilt from them.
ARCHITECTURE_FIELDS = (
    "norm_type",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "post_num",
    "lns_mode",
    "rotary_base",
    "layernorm_epsilon",
    "untie_embeddings_and_output_weights",
)


@dataclass
class ParallelConfig:
    """How the model is split over processes (Megatron-LM's flag names)."""

    tensor_model_parallel_size: int = option(
        1, "TP: each layer's matrices split over this many ranks"
    )
    pipeline_model_parallel_size: int = option(1, "PP: the layers split into this many stages")
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "interleaved PP: layers per virtual stage (a stage holds several chunks)"
    )
    sequence_parallel: bool = option(
        False, "SP (with TP > 1): norms and dropout on a 1/TP slice of the sequence"
    )
    use_distributed_optimizer: bool = option(
        False, "shard the optimizer state (and fp32 master weights) over data-parallel ranks"
    )
    distributed_timeout_minutes: float = option(
        30.0,
        "process-group timeout: a collective that waits longer than this fails the run instead "
        "of hanging (a frozen or dead peer)",
    )
    overlap_grad_reduce: bool = option(
        False, "reduce data-parallel gradients bucket by bucket during backward"
    )
    overlap_param_gather: bool = option(
        False,
        "distributed optimizer: all-gather parameters bucket by bucket during the next forward",
    )
    ddp_bucket_size: Optional[int] = option(
        None,
        "elements per gradient bucket with --overlap-grad-reduce (default: "
        "megatron-core's, max(40M, 1M × data-parallel size))",
    )

    def virtual_pipeline_model_parallel_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline stage (interleaved 1F1B), or None without interleaving."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_stage = num_layers // self.pipeline_model_parallel_size
        return per_stage // self.num_layers_per_virtual_pipeline_stage

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> ParallelConfig:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        require(tp >= 1, "tensor_model_parallel_size", f"must be ≥ 1, got {tp}")
        require(pp >= 1, "pipeline_model_parallel_size", f"must be ≥ 1, got {pp}")
        require(
            model.num_attention_heads % tp == 0,
            "tensor_model_parallel_size",
            f"{model.num_attention_heads} attention heads are not divisible by TP size {tp}",
        )
        require(
            model.query_groups % tp == 0,
            "tensor_model_parallel_size",
            f"{model.query_groups} query groups are not divisible by TP size {tp}",
        )
        require(
            model.ffn_hidden_size % tp == 0,
            "tensor_model_parallel_size",
            f"FFN hidden size {model.ffn_hidden_size} is not divisible by TP size {tp}",
        )
        require(
            model.padded_vocab_size() % tp == 0,
            "make_vocab_size_divisible_by",
            f"the padded vocabulary ({model.padded_vocab_size()}) is not divisible by TP size "
            f"{tp}; use a multiple of {tp}",
        )
        require(
            model.num_layers % pp == 0,
            "pipeline_model_parallel_size",
            f"{model.num_layers} layers are not divisible by {pp} pipeline stages",
        )
        require(
            not self.sequence_parallel or tp > 1,
            "sequence_parallel",
            "needs --tensor-model-parallel-size > 1",
        )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            per_stage = model.num_layers // pp
            chunk = self.num_layers_per_virtual_pipeline_stage
            require(
                pp > 1,
                "num_layers_per_virtual_pipeline_stage",
                "needs --pipeline-model-parallel-size > 1",
            )
            require(
                chunk > 0 and per_stage % chunk == 0,
                "num_layers_per_virtual_pipeline_stage",
                f"{per_stage} layers per pipeline stage are not divisible into chunks of {chunk}",
            )
        require(
            not self.overlap_param_gather
            or (self.use_distributed_optimizer and self.overlap_grad_reduce),
            "overlap_param_gather",
            "needs --use-distributed-optimizer and --overlap-grad-reduce",
        )
        require(
            self.distributed_timeout_minutes > 0,
            "distributed_timeout_minutes",
            "must be a positive number of minutes",
        )
        require(
            self.ddp_bucket_size is None or self.ddp_bucket_size > 0,
            "ddp_bucket_size",
            f"must be a positive number of elements, got {self.ddp_bucket_size}",
        )
        require(
            self.ddp_bucket_size is None or self.overlap_grad_reduce,
            "ddp_bucket_size",
            "only applies with --overlap-grad-reduce (without it gradients are reduced at once)",
        )
        if world_size is not None:
            require(
                world_size % (tp * pp) == 0,
                "tensor_model_parallel_size",
                f"world size {world_size} is not divisible by TP×PP = {tp * pp}",
            )
        return self

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)
