"""Hugging Face configuration of a GPAS-family Llama model (any of the 11 norm types).

Self-contained (torch and transformers only): this file is copied into every export so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without this package.
Which norms sit where is derived from ``norm_type`` exactly as in training (spec §3).
"""

from __future__ import annotations

import math
from typing import Optional

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

#: norm type → (layer style, has GPAS, DeepNorm residual, LayerNorm-Scaling)
NORM_TYPES = {
    "post": ("post", False, False, False),
    "deeppost": ("post", False, True, False),
    "pre": ("pre", False, False, False),
    "sandwich": ("sandwich", False, False, False),
    "post_pre": ("mix", False, False, False),
    "lns": ("pre", False, False, True),
    "deeppost_gpas": ("post", True, True, False),
    "pre_gpas": ("pre", True, False, False),
    "sandwich_gpas": ("sandwich", True, False, False),
    "post_pre_gpas": ("mix", True, False, False),
    "lns_gpas": ("pre", True, False, True),
}
LNS_MODES = ("gamma", "fixed")


@strict
class GPASConfig(LlamaConfig):
    """LlamaConfig plus the architecture switches of the GPAS comparison grid.

    norm_type: one of ``NORM_TYPES``. post_num: Mix-LN's number of leading Post-LN layers
    (None: num_hidden_layers // 4). lns_mode: "gamma" (the multiplier lives in γ) or "fixed"
    (a constant 1/√(l+1) after both pre-norms). deepnorm_alpha: DeepNorm's residual scale
    (None: (2L)^¼).
    """

    model_type = "gpas_llama"

    norm_type: str = "pre_gpas"
    post_num: Optional[int] = None
    lns_mode: str = "gamma"
    deepnorm_alpha: Optional[float] = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type {self.norm_type!r} is not one of {', '.join(NORM_TYPES)}")
        if self.lns_mode not in LNS_MODES:
            raise ValueError(f"lns_mode {self.lns_mode!r} is not one of {LNS_MODES}")

    @property
    def has_gpas(self) -> bool:
        return NORM_TYPES[self.norm_type][1]

    @property
    def resolved_post_num(self) -> int:
        return self.num_hidden_layers // 4 if self.post_num is None else self.post_num

    def layer_style(self, layer_idx: int) -> str:
        """ "pre", "post" or "sandwich" for the 0-based layer ``layer_idx``."""
        style = NORM_TYPES[self.norm_type][0]
        if style == "mix":
            return "post" if layer_idx < self.resolved_post_num else "pre"
        return style

    def residual_scale(self) -> float:
        """α multiplying the shortcut of post-norm layers (1 without DeepNorm)."""
        if not NORM_TYPES[self.norm_type][2]:
            return 1.0
        if self.deepnorm_alpha is not None:
            return float(self.deepnorm_alpha)
        return (2.0 * self.num_hidden_layers) ** 0.25

    def pre_norm_output_scale(self, layer_idx: int) -> float:
        """The fixed LNS multiplier 1/√(l+1) after the pre-norms (1 unless lns_mode="fixed")."""
        if NORM_TYPES[self.norm_type][3] and self.lns_mode == "fixed":
            return 1.0 / math.sqrt(layer_idx + 1)
        return 1.0


__all__ = ["GPASConfig"]
