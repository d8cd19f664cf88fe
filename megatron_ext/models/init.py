"""Layout-invariant weight initialization (spec §1 and §3.1).

Every parameter's *full logical* tensor is drawn from a generator seeded by (seed, global
parameter name), then this rank's slice is copied in. The same seed therefore gives bit-identical
models under any TP / PP / virtual-PP layout, which makes parallel runs comparable with a
single-process run and lets a run restart under another layout from the same init.

Init rules (the reference's):
* embedding N(0, embedding_init_std²) (√0.4 by default, "Spike No More");
* q, k, v, gate, up: N(0, σ²); o and down: N(0, σ²), or σ/√(2L) with ``scaled_output_init``;
* output layer N(0, σ²); norm γ = 1, except LNS pre-norms (learnable form) 1/√(l+1);
* GPAS gates = gate_init (0);
* DeepNorm (``recipe.deepnorm_init``): xavier-normal with gain β = (8L)^-¼ on v, o, gate, up,
  down and gain 1 on q, k, with fan-in/fan-out of the logical, unsharded matrices.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable

import torch

from megatron_ext.config import ModelConfig
from megatron_ext.layers.specs import model_layer_recipes
from megatron_ext.layers.transformer_layer import GATE_PARAM_NAME
from megatron_ext.variants import LayerRecipe, deepnorm_beta


def _generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return gen


def _normal(shape, std: float, seed: int, name: str) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed, name), dtype=torch.float32) * std


def _xavier_std(gain: float, fan_out: int, fan_in: int) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


class _LayerInit:
    """Full tensors of one decoder layer's matrices, in megatron-core's global layouts."""

    def __init__(self, cfg: ModelConfig, recipe: LayerRecipe, seed: int, prefix: str):
        self.cfg, self.recipe, self.seed, self.prefix = cfg, recipe, seed, prefix
        h, L = cfg.hidden_size, cfg.num_layers
        self.beta = deepnorm_beta(L)
        sigma = cfg.init_method_std
        self.std_in = sigma
        self.std_out = sigma / math.sqrt(2.0 * L) if cfg.scaled_output_init else sigma
        self.h = h

    def _matrix(self, role: str, out_features: int, in_features: int, gain: float, std: float):
        if self.recipe.deepnorm_init:
            std = _xavier_std(gain, out_features, in_features)
        return _normal((out_features, in_features), std, self.seed, self.prefix + role)

    def qkv(self) -> torch.Tensor:
        """[ng·(r+2)·d, h], rows grouped per query group: [q_g (r·d) | k_g (d) | v_g (d)]."""
        cfg, h = self.cfg, self.h
        nq, ng, d = cfg.num_attention_heads, cfg.query_groups, cfg.kv_channels
        q = self._matrix("q", nq * d, h, 1.0, self.std_in)
        k = self._matrix("k", ng * d, h, 1.0, self.std_in)
        v = self._matrix("v", ng * d, h, self.beta, self.std_in)
        r = nq // ng
        return torch.cat([q.view(ng, r * d, h), k.view(ng, d, h), v.view(ng, d, h)], dim=1).reshape(
            -1, h
        )

    def proj(self) -> torch.Tensor:
        cfg = self.cfg
        return self._matrix(
            "o", self.h, cfg.num_attention_heads * cfg.kv_channels, self.beta, self.std_out
        )

    def fc1_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.cfg.ffn_hidden_size
        return (
            self._matrix("gate", f, self.h, self.beta, self.std_in),
            self._matrix("up", f, self.h, self.beta, self.std_in),
        )

    def fc2(self) -> torch.Tensor:
        return self._matrix("down", self.h, self.cfg.ffn_hidden_size, self.beta, self.std_out)


def _tp_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int):
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def _fc1_slice(gate, up, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Each TP rank holds [gate_t; up_t] (SwiGLU fc1, megatron-core's layout)."""
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)


def initialize_model(
    chunks: Iterable[torch.nn.Module],
    cfg: ModelConfig,
    seed: int,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Initialise every parameter of the GPTModel ``chunks`` (one per virtual stage)."""
    recipes = model_layer_recipes(cfg)
    with torch.no_grad():
        for chunk in chunks:
            _initialize_chunk(chunk, cfg, recipes, seed, tp_rank, tp_size, cfg.gate_init)


def _copy(param: torch.nn.Parameter, local: torch.Tensor) -> None:
    if tuple(local.shape) != tuple(param.shape):
        raise RuntimeError(f"init shape mismatch: {tuple(local.shape)} vs {tuple(param.shape)}")
    param.copy_(local.to(device=param.device, dtype=param.dtype))


def _initialize_chunk(chunk, cfg, recipes, seed, tp_rank, tp_size, gate_value) -> None:
    emb = getattr(chunk, "embedding", None)
    if emb is not None:
        w = emb.word_embeddings.weight
        padded_vocab = w.shape[0] * (tp_size if getattr(w, "tensor_model_parallel", False) else 1)
        full = _normal(
            (padded_vocab, cfg.hidden_size),
            cfg.embedding_init_std,
            seed,
            "embedding.word_embeddings.weight",
        )
        _copy(w, _tp_slice(full, w, tp_rank, tp_size))
    out = getattr(chunk, "output_layer", None)
    if out is not None and out.weight is not None and cfg.untie_embeddings_and_output_weights:
        w = out.weight
        rows = w.shape[0] * (tp_size if getattr(w, "tensor_model_parallel", False) else 1)
        full = _normal((rows, cfg.hidden_size), cfg.init_method_std, seed, "output_layer.weight")
        _copy(w, _tp_slice(full, w, tp_rank, tp_size))
    decoder = chunk.decoder
    if getattr(decoder, "final_layernorm", None) is not None:
        _fill_norms(decoder.final_layernorm, 1.0)
    for layer in decoder.layers:
        index = layer.layer_number - 1
        _initialize_layer(layer, cfg, recipes[index], seed, tp_rank, tp_size, gate_value, index)


def _fill_norms(module: torch.nn.Module, value: float) -> None:
    for pname, p in module.named_parameters():
        p.fill_(0.0 if pname.endswith("bias") else value)


def _initialize_layer(layer, cfg, recipe, seed, tp_rank, tp_size, gate_value, index) -> None:
    init = _LayerInit(cfg, recipe, seed, prefix=f"decoder.layers.{index}.")
    handlers: dict[str, Callable[[torch.nn.Parameter], torch.Tensor]] = {
        "self_attention.linear_qkv.weight": lambda p: _tp_slice(init.qkv(), p, tp_rank, tp_size),
        "self_attention.linear_proj.weight": lambda p: _tp_slice(init.proj(), p, tp_rank, tp_size),
        "mlp.linear_fc1.weight": lambda p: _fc1_slice(*init.fc1_halves(), tp_rank, tp_size),
        "mlp.linear_fc2.weight": lambda p: _tp_slice(init.fc2(), p, tp_rank, tp_size),
    }
    pre_norm_params = {
        "input_layernorm.weight",
        "pre_mlp_layernorm.weight",
        "self_attention.linear_qkv.layer_norm_weight",
        "mlp.linear_fc1.layer_norm_weight",
    }
    for name, param in layer.named_parameters():
        if name in handlers:
            _copy(param, handlers[name](param))
        elif name == GATE_PARAM_NAME:
            param.fill_(gate_value)
        elif name in pre_norm_params:
            param.fill_(recipe.pre_norm_gamma_init)
        elif name.endswith("bias"):
            param.zero_()
        elif "layernorm" in name or "layer_norm" in name:
            param.fill_(1.0)
        else:
            raise RuntimeError(f"no init rule for parameter decoder.layers.{index}.{name}")
