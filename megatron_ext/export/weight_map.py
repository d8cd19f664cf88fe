"""Where each Hugging Face tensor lives in a megatron-core checkpoint, and the two layouts that
differ (megatron_notes §4.5):

* QKV: megatron's ``linear_qkv.weight`` is grouped per query group, ``[q_g (r·d rows) | k_g | v_g]``
  for g = 0…ng−1, not ``[Q; K; V]``;
* SwiGLU: the global ``linear_fc1.weight`` is ``[gate; up]`` (HF ``gate_proj``, ``up_proj``).

RoPE is rotate-half in both, so no Q/K permutation. Norm names per layer style follow the
reference implementation (spec §3).
"""

from __future__ import annotations

import torch

from megatron_ext.variants import LayerStyle

EMBEDDING = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
LM_HEAD = ("lm_head.weight", "output_layer.weight")

QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
GATE = "gpas_gate"
HF_GATE = "gpas_block.gate"

_LINEARS = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}

_NORMS = {
    LayerStyle.PRE: {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    },
    LayerStyle.SANDWICH: {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "post_attention_layernorm.weight": "post_self_attn_layernorm.weight",
        "pre_feedforward_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
        "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
    },
    LayerStyle.POST: {
        "post_attention_layernorm.weight": "post_attn_add_layernorm.weight",
        "post_feedforward_layernorm.weight": "post_mlp_add_layernorm.weight",
    },
}


def layer_norm_names(style: LayerStyle) -> dict[str, str]:
    """HF name → megatron name of the norms of a layer of ``style`` (within the layer)."""
    return dict(_NORMS[style])


def layer_linear_names() -> dict[str, str]:
    """HF name → megatron name of the linears that map one to one."""
    return dict(_LINEARS)


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron ``linear_qkv.weight`` → HF (q_proj, k_proj, v_proj) weights."""
    per_group = num_heads // num_groups
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(num_groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """HF (q_proj, k_proj, v_proj) weights → megatron ``linear_qkv.weight``."""
    hidden = q.shape[-1]
    head_dim = k.shape[0] // num_groups
    per_group = num_heads // num_groups
    grouped = torch.cat(
        [
            q.reshape(num_groups, per_group * head_dim, hidden),
            k.reshape(num_groups, head_dim, hidden),
            v.reshape(num_groups, head_dim, hidden),
        ],
        dim=1,
    )
    return grouped.reshape(-1, hidden)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron ``linear_fc1.weight`` → HF (gate_proj, up_proj) weights."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)
