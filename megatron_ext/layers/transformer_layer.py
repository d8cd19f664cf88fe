"""One TransformerLayer for all 11 architectures, driven by a :class:`LayerRecipe`.

The layer keeps megatron-core's submodules (attention, MLP, bias-dropout-add, norms built from the
spec) and adds three things the stock layer lacks: post-sublayer norms (Sandwich), post-add norms
(Post-LN, DeepNorm, Mix-LN's post layers) and the GPAS gate. Its forward states the spec's
per-sublayer equation once:

    pre/sandwich:  h' = G( h + B(F(N_pre(h))) )
    post:          h' = N_post( α·G(h) + F(h) )

where B is the Sandwich branch norm (identity otherwise), G is GPAS (identity when off) and α is
DeepNorm's residual scale (1 otherwise). Both sublayers of a layer share one gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import make_viewless_tensor

from megatron_ext.gpas import residual_add_gpas
from megatron_ext.layers.rms_norm import param_device
from megatron_ext.variants import GPASPlacement, LayerRecipe

#: Attribute set on every GPAS gate parameter (used by clipping, freezing and logging).
GATE_ATTR = "is_gpas_gate"
#: Name of the gate parameter inside a layer.
GATE_PARAM_NAME = "gpas_gate"


@dataclass
class GPASLayerSubmodules(TransformerLayerSubmodules):
    """megatron-core's layer slots plus the norms the stock layer has no place for."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp  # Sandwich: N(A(·))
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp  # Sandwich: N(F(·))
    post_attn_add_layernorm: Union[ModuleSpec, type] = IdentityOp  # Post-LN: N(h + A(h))
    post_mlp_add_layernorm: Union[ModuleSpec, type] = IdentityOp  # Post-LN: N(h + F(h))


def is_gpas_gate(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, GATE_ATTR, False))


class GPASTransformerLayer(TransformerLayer):
    """A decoder layer for any row of ``megatron_ext.variants.NORM_TYPES``."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: GPASLayerSubmodules,
        recipe: LayerRecipe,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.recipe = recipe
        norm_kwargs = dict(
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm, **norm_kwargs
        )
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_kwargs)
        self.post_attn_add_layernorm = build_module(
            submodules.post_attn_add_layernorm, **norm_kwargs
        )
        self.post_mlp_add_layernorm = build_module(submodules.post_mlp_add_layernorm, **norm_kwargs)

        if recipe.gpas is not GPASPlacement.NONE:
            gate = torch.nn.Parameter(
                torch.zeros(1, dtype=config.params_dtype, device=param_device(config))
            )
            setattr(gate, GATE_ATTR, True)
            # With sequence parallelism each TP rank sees part of the sequence, so the gate
            # gradient is a partial sum to be all-reduced over TP like a norm's γ.
            gate.sequence_parallel = config.sequence_parallel
            self.register_parameter(GATE_PARAM_NAME, gate)
        else:
            self.gpas_gate = None

        # Optional recorder of the residual stream (training-dynamics telemetry); see
        # megatron_ext.training.components.telemetry. None costs nothing.
        self.telemetry = None

        # This forward implements MLP recompute itself; norm recompute/offload of the stock
        # layer is not used (full-layer recompute via the block still works).
        self.recompute_input_layernorm = False
        self.recompute_pre_mlp_layernorm = False

    # -- the two halves of the spec equation ------------------------------------------------
    def _branch_output(self, output_with_bias, branch_norm):
        out, bias = output_with_bias
        if isinstance(branch_norm, IdentityOp):
            return out, bias
        if bias is not None:
            out = out + bias
        return branch_norm(out), None

    def _residual_update(self, residual, output_with_bias, bda, post_add_norm):
        recipe = self.recipe
        if recipe.gpas is GPASPlacement.NONE:
            if recipe.residual_scale != 1.0:
                residual = residual * recipe.residual_scale
            with self.bias_dropout_add_exec_handler():
                hidden = bda(self.training, self.config.bias_dropout_fusion)(
                    output_with_bias, residual, self.hidden_dropout
                )
            return post_add_norm(hidden)
        # GPAS is folded into the residual add: one pass instead of an add and a scale.
        out, bias = output_with_bias
        if bias is not None or (self.training and self.hidden_dropout > 0):
            raise NotImplementedError(
                "GPAS layers are built without linear biases and without hidden dropout (the "
                "Llama recipe, spec §1)"
            )
        after_add = recipe.gpas is GPASPlacement.AFTER_ADD
        hidden = residual_add_gpas(
            out, residual, self.gpas_gate, alpha=recipe.residual_scale, after_add=after_add
        )
        # After-the-add placements only occur in pre-norm and Sandwich layers (no post-add norm).
        return hidden if after_add else post_add_norm(hidden)

    def _mlp(self, hidden):
        if self.recompute_mlp:
            return tensor_parallel.checkpoint(self.mlp, False, hidden)
        return self.mlp(hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        rotary_pos_cos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        *,
        inference_params=None,
        **kwargs,
    ):
        inference_context = inference_context if inference_context is not None else inference_params
        attn = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        attn = self._branch_output(attn, self.post_self_attn_layernorm)
        hidden = self._residual_update(
            hidden_states, attn, self.self_attn_bda, self.post_attn_add_layernorm
        )
        if self.telemetry is not None:
            self.telemetry.record(self.layer_number - 1, "attn", hidden)

        mlp = self._mlp(self.pre_mlp_layernorm(hidden))
        mlp = self._branch_output(mlp, self.post_mlp_layernorm)
        output = self._residual_update(hidden, mlp, self.mlp_bda, self.post_mlp_add_layernorm)
        if self.telemetry is not None:
            self.telemetry.record(self.layer_number - 1, "mlp", output)

        # Pipeline sends reject views (deallocate_output_tensor asserts _base is None).
        output = make_viewless_tensor(
            inp=output, requires_grad=output.requires_grad, keep_graph=True
        )
        return output, context
