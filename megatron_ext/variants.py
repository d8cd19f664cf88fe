"""The 11 architectures of the GPAS comparison grid as a table of data (spec §3).

One row per norm type; :func:`layer_recipe` resolves a row into what one decoder layer does.
The layer class (``megatron_ext.layers.transformer_layer``) reads a recipe and never branches on
the norm-type name, so adding an architecture means adding a row here and a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional


class LayerStyle(str, Enum):
    """Where a layer's norms sit."""

    PRE = "pre"  # h + F(N(h))
    POST = "post"  # N(α·h + F(h))
    SANDWICH = "sandwich"  # h + N₂(F(N₁(h)))
    MIX = "mix"  # POST for the first post_num layers, PRE for the rest


class GPASPlacement(str, Enum):
    NONE = "none"
    AFTER_ADD = "after_add"  # G(h + F(...)) — pre and sandwich layers
    SHORTCUT = "shortcut"  # N(α·G(h) + F(h)) — post-norm layers, before ×α


class LNSMode(str, Enum):
    """LayerNorm-Scaling forms (spec §3.1)."""

    GAMMA = "gamma"  # GPAS reference: pre-norm γ initialized to 1/√(l+1), learnable
    FIXED = "fixed"  # official LNS: constant 1/√(l+1) multiplier after γ


@dataclass(frozen=True)
class NormTypeRow:
    name: str
    style: LayerStyle
    gpas: bool = False
    deepnorm_residual: bool = False  # residual scaled by α = (2L)^¼
    deepnorm_init: bool = False  # xavier gains β = (8L)^-¼ (reference: only for 'deeppost')
    lns: bool = False
    description: str = ""
    base: Optional[str] = None  # a GPAS row: the architecture it adds GPAS to (paper's tables)


NORM_TYPES: dict[str, NormTypeRow] = {
    row.name: row
    for row in (
        NormTypeRow("post", LayerStyle.POST, description="Post-LN"),
        NormTypeRow(
            "deeppost",
            LayerStyle.POST,
            deepnorm_residual=True,
            deepnorm_init=True,
            description="DeepNorm",
        ),
        NormTypeRow("pre", LayerStyle.PRE, description="Pre-LN"),
        NormTypeRow("sandwich", LayerStyle.SANDWICH, description="Sandwich-LN"),
        NormTypeRow("post_pre", LayerStyle.MIX, description="Mix-LN"),
        NormTypeRow("lns", LayerStyle.PRE, lns=True, description="LayerNorm-Scaling"),
        # The reference sets the DeepNorm init only for 'deeppost' exactly: deeppost_gpas gets α
        # on the residual but the plain N(0, 0.02) init (spec §3.1). Switchable in ModelConfig.
        NormTypeRow(
            "deeppost_gpas",
            LayerStyle.POST,
            gpas=True,
            deepnorm_residual=True,
            description="DeepNorm+GPAS",
            base="deeppost",
        ),
        NormTypeRow("pre_gpas", LayerStyle.PRE, gpas=True, description="Pre-LN+GPAS", base="pre"),
        NormTypeRow(
            "sandwich_gpas",
            LayerStyle.SANDWICH,
            gpas=True,
            description="Sandwich-LN+GPAS",
            base="sandwich",
        ),
        NormTypeRow(
            "post_pre_gpas", LayerStyle.MIX, gpas=True, description="Mix-LN+GPAS", base="post_pre"
        ),
        NormTypeRow(
            "lns_gpas", LayerStyle.PRE, gpas=True, lns=True, description="LNS+GPAS", base="lns"
        ),
    )
}

NORM_TYPE_NAMES = tuple(NORM_TYPES)


def paper_order() -> tuple[str, ...]:
    """The paper's row order: each base architecture, then the GPAS rows built on it."""
    order = []
    for row in NORM_TYPES.values():
        if row.base is None:
            order.append(row.name)
            order.extend(r.name for r in NORM_TYPES.values() if r.base == row.name)
    return tuple(order)


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNet decoder residual multiplier α = (2L)^¼."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
    """DeepNet decoder init gain β = (8L)^-¼."""
    return (8.0 * num_layers) ** -0.25


def default_post_num(num_layers: int) -> int:
    """Mix-LN's default number of Post-LN layers, L // 4 (the Mix-LN paper's ratio)."""
    return num_layers // 4


@dataclass(frozen=True)
class LayerRecipe:
    """What one decoder layer computes. Built by :func:`layer_recipe`."""

    style: LayerStyle  # PRE, POST or SANDWICH (MIX is resolved per layer)
    gpas: GPASPlacement
    residual_scale: float  # α on the shortcut of post-norm layers, else 1
    pre_norm_gamma_init: float  # γ init of the pre-norms (LNS learnable form)
    pre_norm_output_scale: float  # fixed multiplier after the pre-norms (LNS fixed form)
    deepnorm_init: bool

    @property
    def has_pre_norms(self) -> bool:
        return self.style in (LayerStyle.PRE, LayerStyle.SANDWICH)

    @property
    def has_branch_norms(self) -> bool:
        return self.style is LayerStyle.SANDWICH

    @property
    def has_post_add_norms(self) -> bool:
        return self.style is LayerStyle.POST


def layer_recipe(
    norm_type: str,
    layer_index: int,
    num_layers: int,
    post_num: Optional[int] = None,
    lns_mode: LNSMode = LNSMode.GAMMA,
    deepnorm_init_for_gpas: bool = False,
) -> LayerRecipe:
    """Resolve ``norm_type`` for the layer at global 0-based ``layer_index``."""
    row = NORM_TYPES[norm_type]
    style = row.style
    if style is LayerStyle.MIX:
        style = LayerStyle.POST if layer_index < post_num else LayerStyle.PRE
    if not row.gpas:
        placement = GPASPlacement.NONE
    elif style is LayerStyle.POST:
        placement = GPASPlacement.SHORTCUT
    else:
        placement = GPASPlacement.AFTER_ADD
    lns_factor = 1.0 / math.sqrt(layer_index + 1) if row.lns else 1.0
    lns_mode = LNSMode(lns_mode)
    return LayerRecipe(
        style=style,
        gpas=placement,
        residual_scale=deepnorm_alpha(num_layers) if row.deepnorm_residual else 1.0,
        pre_norm_gamma_init=lns_factor if lns_mode is LNSMode.GAMMA else 1.0,
        pre_norm_output_scale=lns_factor if lns_mode is LNSMode.FIXED else 1.0,
        deepnorm_init=row.deepnorm_init or (deepnorm_init_for_gpas and row.deepnorm_residual),
    )
