"""Core attention of the local (no Transformer Engine) spec: PyTorch's fused SDPA, or
megatron-core's own ``DotProductAttention``.

megatron-core's local attention materializes the [b·n, s, s] scores (``baddbmm`` into a buffer),
runs the softmax in fp32 with the causal mask rebuilt on every call, then a ``bmm``; its fused
softmax kernels come from Apex. ``torch.nn.functional.scaled_dot_product_attention`` computes the
same function in one call (flash / memory-efficient / cuDNN kernels on GPU, a fused kernel on
CPU) without the score matrix in memory. Selected by ``--attention-backend`` (Megatron-LM's
flag): ``local`` keeps megatron-core's path, ``auto`` (default) takes SDPA.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType


class LocalCoreAttention(DotProductAttention):
    """``DotProductAttention`` whose forward is SDPA unless ``attention_backend`` is local.

    Shapes as megatron-core's: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this TP rank's
    heads and query groups), output [sq, b, np·hn].
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if self.config.attention_backend == AttnBackend.local:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "--attention-backend auto (SDPA) takes neither packed sequences nor an attention "
                "bias; use --attention-backend local"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # megatron-core's masks are True where attention is *not* allowed; SDPA's the opposite.
        sdpa_mask = None if causal or attention_mask is None else ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:  # grouped-query attention: each KV group serves `repeat` query heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        with _dropout_rng(self.config.sequence_parallel, dropout):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=sdpa_mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
            )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def _dropout_rng(sequence_parallel: bool, dropout: float):
    """Attention dropout draws from the model-parallel RNG, as megatron-core's does."""
    if dropout > 0.0 and not sequence_parallel:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()
