"""Megatron-Core layer and block specs for every norm type.

``get_layer_spec(recipe, backend)`` describes one decoder layer; ``get_decoder_block_spec``
resolves every layer of the model (Mix-LN's layers differ), slices the ones this pipeline stage
builds, and adds the final norm. Two backends:

* ``local``: megatron-core's own parallel linears and attention with the project's RMSNorm.
  Runs everywhere, CPU included.
* ``transformer_engine``: TE modules, imported lazily. Pre-norms are fused into the following
  linear (``TELayerNormColumnParallelLinear``); post-add norms (Post-LN, DeepNorm, Mix-LN's post
  layers) need the normalized tensor as the residual, so they use ``TENorm`` and unfused linears;
  Sandwich's branch norms are ``TENorm`` on the row-parallel output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.layers.rms_norm import RMSNorm
from megatron_ext.layers.transformer_layer import GPASLayerSubmodules, GPASTransformerLayer
from megatron_ext.variants import LayerRecipe, LNSMode, layer_recipe

BACKENDS = ("local", "transformer_engine")

# Checkpoint names of the pre-norms are the fused-TE names for both backends, so a checkpoint
# written with one backend loads with the other (as megatron-core's own local spec does).
PRE_NORM_KEY_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


@dataclass(frozen=True)
class _Modules:
    """The classes one backend provides."""

    norm: type
    column_linear: type
    row_linear: type
    core_attention: type
    fused_norm_column_linear: Optional[type]  # None: the backend cannot fuse norm + linear


def _local_modules() -> _Modules:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.layers.core_attention import LocalCoreAttention

    return _Modules(RMSNorm, ColumnParallelLinear, RowParallelLinear, LocalCoreAttention, None)


TE_MISSING = (
    "--transformer-impl transformer_engine needs Transformer Engine (pip install "
    "transformer-engine[pytorch], or tools/install_te_offline.sh); use --transformer-impl local "
    "without it"
)


def _te_modules() -> _Modules:
    """megatron-core's TE modules. Without TE, megatron-core defines stand-ins (mocks) that fail
    only when a layer is built, with no word of TE: its own ``HAVE_TE`` is asked first."""
    try:
        from megatron.core.extensions import transformer_engine as te_extension
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise ConfigError(TE_MISSING) from err
    if not getattr(te_extension, "HAVE_TE", False):
        raise ConfigError(TE_MISSING)
    return _Modules(
        TENorm,
        TEColumnParallelLinear,
        TERowParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
    )


def _backend_modules(backend: str) -> _Modules:
    if backend == "local":
        return _local_modules()
    if backend == "transformer_engine":
        return _te_modules()
    raise ValueError(f"--transformer-impl: unknown backend {backend!r}; choose one of {BACKENDS}")


def get_layer_spec(recipe: LayerRecipe, backend: str = "local") -> ModuleSpec:
    """The ModuleSpec of one decoder layer computing ``recipe``."""
    m = _backend_modules(backend)
    norm = m.norm
    fuse_pre_norms = recipe.has_pre_norms and m.fused_norm_column_linear is not None

    if recipe.has_pre_norms and not fuse_pre_norms:
        pre_norm = ModuleSpec(
            module=RMSNorm,
            params={
                "gamma_init": recipe.pre_norm_gamma_init,
                "output_scale": recipe.pre_norm_output_scale,
            },
        )
    else:
        # Fused: the norm lives inside the linear (its γ init is applied by the initializer).
        pre_norm = IdentityOp
    if fuse_pre_norms and recipe.pre_norm_output_scale != 1.0:
        raise ValueError(
            "--lns-mode fixed cannot be fused into Transformer Engine's LayerNorm-Linear; "
            "use --lns-mode gamma (forward-identical at init) or --transformer-impl local"
        )
    input_linear = m.fused_norm_column_linear if fuse_pre_norms else m.column_linear
    branch_norm = norm if recipe.has_branch_norms else IdentityOp
    post_add_norm = norm if recipe.has_post_add_norms else IdentityOp

    return ModuleSpec(
        module=GPASTransformerLayer,
        params={"recipe": recipe},
        submodules=GPASLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=input_linear,
                    core_attention=m.core_attention,
                    linear_proj=m.row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=input_linear, linear_fc2=m.row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            post_self_attn_layernorm=branch_norm,
            post_mlp_layernorm=branch_norm,
            post_attn_add_layernorm=post_add_norm,
            post_mlp_add_layernorm=post_add_norm,
            sharded_state_dict_keys_map=dict(PRE_NORM_KEY_MAP)
            if (recipe.has_pre_norms and not fuse_pre_norms)
            else {},
        ),
    )


def model_layer_recipes(model: ModelConfig) -> list[LayerRecipe]:
    """The recipe of every layer of ``model``, global order."""
    return [
        layer_recipe(
            model.norm_type,
            i,
            model.num_layers,
            post_num=model.resolved_post_num,
            lns_mode=LNSMode(model.lns_mode),
            deepnorm_init_for_gpas=model.deepnorm_init_for_gpas,
        )
        for i in range(model.num_layers)
    ]


def get_decoder_block_spec(
    model: ModelConfig,
    config: TransformerConfig,
    backend: str = "local",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec holding the layers this pipeline stage (and virtual stage) builds."""
    layer_specs = [get_layer_spec(r, backend) for r in model_layer_recipes(model)]
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm = _backend_modules(backend).norm
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + num_local], layer_norm=final_norm
    )
