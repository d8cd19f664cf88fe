"""Build megatron-core's GPTModel for any norm type."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import ModelConfig, ParallelConfig
from megatron_ext.layers.specs import get_decoder_block_spec
from megatron_ext.models.init import initialize_model
from megatron_ext.variants import LayerStyle


def build_transformer_config(
    model: ModelConfig,
    parallel: Optional[ParallelConfig] = None,
    *,
    bf16: bool = False,
    use_cpu: bool = False,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    **overrides,
) -> TransformerConfig:
    """The megatron-core TransformerConfig of a Llama-style model (spec §1).

    No biases, no dropout, RMSNorm ε 1e-6, SwiGLU, RoPE, untied head. The final weights come from
    :func:`megatron_ext.models.init.initialize_model`; megatron-core's own init still runs first
    because it is also where megatron-core tags tensor-parallel weights (``tensor_model_parallel``,
    ``partition_dim``), which gradient-norm and checkpoint code rely on.
    """
    model.validate()
    parallel = (parallel or ParallelConfig()).validate(model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=model.init_method_std,
        perform_initialization=True,
        use_cpu_initialization=use_cpu,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size(
            model.num_layers
        ),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # Mix-LN's post and pre layers own different norms: save them per layer.
        hetereogenous_dist_checkpoint=model.row.style is LayerStyle.MIX,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        cuda_graph_impl="none",
        **_p2p_settings(parallel, model.num_layers),
    )
    kwargs.update(overrides)
    if isinstance(kwargs.get("attention_backend"), str):  # a name from the configuration
        kwargs["attention_backend"] = AttnBackend[kwargs["attention_backend"]]
    return TransformerConfig(**kwargs)


def _p2p_settings(parallel: ParallelConfig, num_layers: int) -> dict:
    """Pipeline send/receive mode: separate (overlapped) operations under interleaving.

    megatron-core's batched mode posts one list [send prev, recv prev, send next, recv next].
    With two pipeline stages the previous and the next stage are the same process, and point-to-
    point messages between two processes are matched in the order they are posted, so in the
    interleaved schedule's steady state (a forward and a backward exchanged in one call, i.e.
    more micro-batches than stages) an activation is received as a gradient and vice versa:
    wrong losses and gradients with no error. The separate mode sends the two directions on two
    communicators when there are two stages (and is Megatron-LM's default under interleaving).
    """
    if parallel.virtual_pipeline_model_parallel_size(num_layers) is None:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


_NVTE_BACKEND_VARS = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def _attention_backend_env(transformer_impl: str):
    """GPTModel records its attention backend in Transformer Engine's ``NVTE_*_ATTN`` variables
    and refuses a later model whose backend disagrees with them. They steer only TE, so a model
    of the local spec is built without them and the environment is left as it was found; TE
    models keep what megatron-core sets (TE reads it when attention runs)."""
    if transformer_impl != "local":
        yield
        return
    saved = {name: os.environ.pop(name) for name in _NVTE_BACKEND_VARS if name in os.environ}
    try:
        yield
    finally:
        for name in _NVTE_BACKEND_VARS:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _gpt_model(model: ModelConfig, config, transformer_impl, vocab, vp_stage, pp_rank):
    return GPTModel(
        config=config,
        transformer_layer_spec=get_decoder_block_spec(
            model, config, transformer_impl, vp_stage=vp_stage, pp_rank=pp_rank
        ),
        vocab_size=vocab,
        max_sequence_length=model.max_positions,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    seed: int = 1234,
    transformer_impl: str = "local",
    vp_stage: Optional[int] = None,
    initialize: bool = True,
) -> GPTModel:
    """One GPTModel chunk (the whole model without virtual pipelining) for this rank."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    vocab = model.padded_vocab_size()
    with _attention_backend_env(transformer_impl):
        gpt = _gpt_model(model, config, transformer_impl, vocab, vp_stage, pp_rank)
    if initialize:
        initialize_model(
            [gpt],
            model,
            seed=seed,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=tp_size,
        )
    return gpt


def build_model_chunks(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    seed: int = 1234,
    transformer_impl: str = "local",
) -> list[GPTModel]:
    """All model chunks of this rank: one, or one per virtual pipeline stage."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [
        build_model(model, config, seed=seed, transformer_impl=transformer_impl, vp_stage=s)
        for s in stages
    ]


def unwrap_model(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
