"""Parameter counts of a ModelConfig, computed from its shapes (no model is built)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config import ModelConfig
from megatron_ext.layers.specs import model_layer_recipes


@dataclass(frozen=True)
class ParameterCount:
    embedding: int  # input embedding + untied output layer
    non_embedding: int  # decoder layers + final norm (gates included)
    gates: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding

    def __str__(self) -> str:
        return (
            f"{self.total / 1e6:,.1f}M parameters ({self.non_embedding / 1e6:,.1f}M "
            f"non-embedding, {self.embedding / 1e6:,.1f}M embedding, {self.gates} GPAS gates)"
        )


def count_parameters(cfg: ModelConfig, padded_vocab: bool = False) -> ParameterCount:
    """Exact parameter count of ``cfg`` (vocab unpadded unless ``padded_vocab``)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    d, nq, ng = cfg.kv_channels, cfg.num_attention_heads, cfg.query_groups
    vocab = cfg.padded_vocab_size() if padded_vocab else cfg.vocab_size
    heads = 2 if cfg.untie_embeddings_and_output_weights else 1
    attention = h * (nq + 2 * ng) * d + nq * d * h
    mlp = 3 * h * f
    layers, gates = 0, 0
    for recipe in model_layer_recipes(cfg):
        norms = 2 * int(recipe.has_pre_norms) + 2 * int(recipe.has_branch_norms)
        norms += 2 * int(recipe.has_post_add_norms)
        gate = int(recipe.gpas.value != "none")
        layers += attention + mlp + norms * h + gate
        gates += gate
    return ParameterCount(embedding=heads * vocab * h, non_embedding=layers + h, gates=gates)
