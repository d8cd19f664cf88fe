"""Our megatron-core model on one CPU process, for checking an export and for importing weights."""

from __future__ import annotations

import torch

from megatron_ext.config import ModelConfig
from megatron_ext.layers.specs import PRE_NORM_KEY_MAP
from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.platform.distributed import ensure_single_process_cpu


def build_cpu_model(model: ModelConfig, dtype: torch.dtype = torch.float32):
    """An uninitialized model (weights to be loaded) with all layers in this process."""
    ensure_single_process_cpu()
    config = build_transformer_config(model, use_cpu=True)
    return build_model(model, config, initialize=False).to(dtype)


def checkpoint_param_names(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's parameters under their checkpoint names (pre-norms under the fused names)."""
    out = {}
    for name, param in module.named_parameters():
        for local, stored in PRE_NORM_KEY_MAP.items():
            name = name.replace("." + local, "." + stored)
        out[name] = param
    return out


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits [b, s, vocab_size] (the padded vocabulary rows dropped)."""
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None)[..., :vocab_size].float()
