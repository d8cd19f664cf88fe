"""Fold a Pre-LN-style GPAS / LNS model into a stock Llama (spec §9).

With c_l = 1 − SiLU(g_l) and the stream's cumulative scale P (P_l^A = ∏_{j<l} c_j² before layer
l's attention, P_l^M = c_l·P_l^A before its MLP, P_L = ∏ c_j² at the final norm), RMSNorm's scale
invariance N(P·u; γ, ε) = N(u; sgn(P)·γ, ε/P²) gives a plain Pre-LN model with

    W_o' = W_o / P_l^A,  γ1' = sgn(P_l^A)·γ1,  W_down' = W_down / P_l^M,  γ2' = sgn(P_l^M)·γ2,
    γ_f' = sgn(P_L)·γ_f,

everything else unchanged. The fixed LNS multiplier 1/√(l+1) folds into both pre-norm γ. The one
inexact part: a stock Llama has one ε, so its norms act like the trained model's with ε·P² in place
of ε; :meth:`LlamaFold.epsilon_report` says how far that is from ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.config import ModelConfig
from megatron_ext.gpas import gpas_scale
from megatron_ext.layers.specs import model_layer_recipes
from megatron_ext.variants import LayerStyle


class FoldError(ValueError):
    """The model cannot be written as a stock Llama; the message says why and what to use."""


@dataclass
class LlamaFold:
    attn_scale: list[float]  # P_l^A
    mlp_scale: list[float]  # P_l^M
    final_scale: float  # P_L
    pre_norm_factor: list[float]  # fixed LNS multiplier per layer (1 otherwise)
    eps: float

    def o_proj(self, layer: int, w: torch.Tensor) -> torch.Tensor:
        return w.float() / self.attn_scale[layer]

    def down_proj(self, layer: int, w: torch.Tensor) -> torch.Tensor:
        return w.float() / self.mlp_scale[layer]

    def input_norm(self, layer: int, gamma: torch.Tensor) -> torch.Tensor:
        sign = math.copysign(1.0, self.attn_scale[layer])
        return gamma.float() * (sign * self.pre_norm_factor[layer])

    def pre_mlp_norm(self, layer: int, gamma: torch.Tensor) -> torch.Tensor:
        sign = math.copysign(1.0, self.mlp_scale[layer])
        return gamma.float() * (sign * self.pre_norm_factor[layer])

    def final_norm(self, gamma: torch.Tensor) -> torch.Tensor:
        return gamma.float() * math.copysign(1.0, self.final_scale)

    def epsilon_report(self) -> str:
        """The largest change of ε (in the trained model's units) the shared ε implies."""
        norms = [(f"layer {i} attention norm", p) for i, p in enumerate(self.attn_scale)]
        norms += [(f"layer {i} MLP norm", p) for i, p in enumerate(self.mlp_scale)]
        norms.append(("final norm", self.final_scale))
        where, p = max(norms, key=lambda item: abs(item[1] ** 2 - 1.0))
        delta = self.eps * abs(p**2 - 1.0)
        return (
            f"cumulative stream scale P in [{min(abs(s) for _, s in norms):.4g}, "
            f"{max(abs(s) for _, s in norms):.4g}]; worst ε effect at the {where}: the export "
            f"acts as ε·P² = {self.eps * p**2:.3g} instead of ε = {self.eps:g} there, i.e. a "
            f"relative change of the norm output ≤ {delta:.3g} / (2·mean(h²)) of that norm's "
            "input (negligible unless the stream RMS is near √ε)"
        )


def is_llama_foldable(model: ModelConfig) -> bool:
    """True when every layer is Pre-LN-shaped (pre, lns, pre_gpas, lns_gpas; Mix-LN with no
    post layers)."""
    return all(r.style is LayerStyle.PRE for r in model_layer_recipes(model))


def plan_llama_fold(model: ModelConfig, gates: list[Optional[torch.Tensor]]) -> LlamaFold:
    """The fold of ``model`` given each layer's gate (None for layers without GPAS)."""
    if not is_llama_foldable(model):
        raise FoldError(
            f"--target llama: norm type {model.norm_type!r} has post-norm or sandwich layers, "
            "which a stock LlamaForCausalLM cannot express; use --target gpas "
            "(GPASForCausalLM, loaded with trust_remote_code=True)"
        )
    recipes = model_layer_recipes(model)
    attn, mlp, scale = [], [], 1.0
    for layer, gate in enumerate(gates):
        c = 1.0
        if gate is not None:
            c = float(gpas_scale(gate, torch.float64))
            if c == 0.0:
                raise FoldError(
                    f"--target llama: layer {layer} has c = 1 − SiLU(g) = 0 (g = "
                    f"{float(gate.reshape(())):.6g}): the stream is zeroed there and no Llama "
                    "is equal to it; use --target gpas"
                )
        attn.append(scale)
        mlp.append(c * scale)
        scale *= c * c
    return LlamaFold(
        attn_scale=attn,
        mlp_scale=mlp,
        final_scale=scale,
        pre_norm_factor=[r.pre_norm_output_scale for r in recipes],
        eps=model.layernorm_epsilon,
    )
