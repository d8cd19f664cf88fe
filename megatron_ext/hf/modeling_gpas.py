"""Hugging Face modeling code of GPAS-family Llama models: all 11 norm types of the grid.

Self-contained (torch, transformers and ``configuration_gpas``), copied into every export. The
attention, MLP, RMSNorm and rotary embedding are transformers' own Llama modules, so KV caching,
SDPA/flash attention and ``generate`` behave as for Llama. Per layer (spec §3), with G the GPAS
op of the layer (identity without GPAS) and α DeepNorm's residual scale (1 otherwise):

    pre:       h' = G(h + A(N1(h)))               h_out = G(h' + F(N_pa(h')))
    sandwich:  h' = G(h + N_pa(A(N1(h))))         h_out = G(h' + N_pff(F(N_pf(h'))))
    post:      h' = N_pa(α·G(h) + A(h))           h_out = N_pff(α·G(h') + F(h'))

Parameter names follow the reference implementation (``gpas_block.gate``, ``input_layernorm``,
``post_attention_layernorm``, ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_gpas import GPASConfig


class GPASBlock(nn.Module):
    """G(x) = x − SiLU(g)·sg(x): forward value (1 − SiLU(g))·x, input gradient unscaled."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf - F.silu(self.gate.float()) * xf.detach()).to(x.dtype)

    def scale(self) -> float:
        return float(1.0 - F.silu(self.gate.detach().float()))


class GPASDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: GPASConfig, layer_idx: int):
        super().__init__()
        self.style = config.layer_style(layer_idx)
        self.alpha = config.residual_scale() if self.style == "post" else 1.0
        self.pre_norm_scale = config.pre_norm_output_scale(layer_idx)
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)

        def norm():
            return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        if self.style in ("pre", "sandwich"):
            self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if self.style == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.style in ("post", "sandwich"):
            self.post_feedforward_layernorm = norm()
        self.gpas_block = GPASBlock() if config.has_gpas else None

    def _gpas(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gpas_block is None else self.gpas_block(x)

    def _pre_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = norm(x)
        return out * self.pre_norm_scale if self.pre_norm_scale != 1.0 else out

    def _attention(self, x, **kwargs):
        out, _ = self.self_attn(hidden_states=x, **kwargs)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        use_cache: Optional[bool] = False,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        h = hidden_states
        if self.style == "post":
            h = self.post_attention_layernorm(
                self.alpha * self._gpas(h) + self._attention(h, **attn_kwargs)
            )
            return self.post_feedforward_layernorm(self.alpha * self._gpas(h) + self.mlp(h))
        attn = self._attention(self._pre_norm(self.input_layernorm, h), **attn_kwargs)
        if self.style == "sandwich":
            h = self._gpas(h + self.post_attention_layernorm(attn))
            mlp = self.mlp(self.pre_feedforward_layernorm(h))
            return self._gpas(h + self.post_feedforward_layernorm(mlp))
        h = self._gpas(h + attn)
        return self._gpas(h + self.mlp(self._pre_norm(self.post_attention_layernorm, h)))


class GPASPreTrainedModel(LlamaPreTrainedModel):
    config_class = GPASConfig
    _no_split_modules = ["GPASDecoderLayer"]
    _can_record_outputs = {"hidden_states": GPASDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GPASBlock):
            nn.init.zeros_(module.gate)


class GPASModel(GPASPreTrainedModel, LlamaModel):
    """LlamaModel's embedding, final norm, rotary embedding and forward with GPAS layers."""

    def __init__(self, config: GPASConfig):
        GPASPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GPASDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class GPASForCausalLM(GPASPreTrainedModel, LlamaForCausalLM):
    """Causal LM head (untied) on :class:`GPASModel`."""

    def __init__(self, config: GPASConfig):
        GPASPreTrainedModel.__init__(self, config)
        self.model = GPASModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def gpas_scales(self) -> list[Optional[float]]:
        """c_l = 1 − SiLU(g_l) of every layer (None for layers without GPAS)."""
        return [
            None if layer.gpas_block is None else layer.gpas_block.scale()
            for layer in self.model.layers
        ]


__all__ = ["GPASForCausalLM", "GPASModel", "GPASPreTrainedModel"]
