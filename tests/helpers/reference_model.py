"""A plain-PyTorch re-derivation of the spec's equations (gpas_reference.md §1–§3).

Written from the spec, independently of the library: it imports nothing from megatron_ext.
Weights are given in Hugging Face-like per-matrix form; ``from_megatron`` converts a TP=1
megatron-core state dict (its own layouts re-derived here from megatron_notes §4.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def rms_norm(x, gamma, eps=EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


def rope(x, base=10000.0):
    """Rotate-half RoPE over the full head dim. x: [b, s, heads, d]."""
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1).to(x.dtype)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(z, w, heads, groups):
    b, s, h = z.shape
    d = h // heads
    q = (z @ w["q"].T).view(b, s, heads, d)
    k = (z @ w["k"].T).view(b, s, groups, d)
    v = (z @ w["v"].T).view(b, s, groups, d)
    q, k = rope(q), rope(k)
    rep = heads // groups
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * d)
    return out @ w["o"].T


def mlp(z, w):
    return (F.silu(z @ w["gate"].T) * (z @ w["up"].T)) @ w["down"].T


def gpas_ref(x, g):
    """The reference's form: x − SiLU(g)·stopgrad(x)."""
    return x - F.silu(g) * x.detach()


def decoder_layer(h, w, norm_type, l, num_layers, post_num, heads, groups, lns_fixed=False):
    """Spec §3 table, one row per norm type, l 0-based."""
    alpha = (2 * num_layers) ** 0.25
    A = lambda z: attention(z, w, heads, groups)
    Fm = lambda z: mlp(z, w)
    N = lambda x, name: rms_norm(x, w[name])
    G = lambda x: gpas_ref(x, w["gpas_gate"])
    lns = 1.0 / math.sqrt(l + 1) if lns_fixed else 1.0
    if norm_type in ("post_pre", "post_pre_gpas"):
        gp = norm_type.endswith("_gpas")
        if l < post_num:
            norm_type = "post_gpas_noalpha" if gp else "post"
        else:
            norm_type = "pre_gpas" if gp else "pre"
    if norm_type == "post":
        h1 = N(h + A(h), "N_pa")
        return N(h1 + Fm(h1), "N_pff")
    if norm_type == "deeppost":
        h1 = N(alpha * h + A(h), "N_pa")
        return N(alpha * h1 + Fm(h1), "N_pff")
    if norm_type in ("pre", "lns"):
        h1 = h + A(N(h, "N1") * lns)
        return h1 + Fm(N(h1, "N_pa") * lns)
    if norm_type == "sandwich":
        h1 = h + N(A(N(h, "N1")), "N_pa")
        return h1 + N(Fm(N(h1, "N_pf")), "N_pff")
    if norm_type == "deeppost_gpas":
        h1 = N(alpha * G(h) + A(h), "N_pa")
        return N(alpha * G(h1) + Fm(h1), "N_pff")
    if norm_type == "post_gpas_noalpha":
        h1 = N(G(h) + A(h), "N_pa")
        return N(G(h1) + Fm(h1), "N_pff")
    if norm_type in ("pre_gpas", "lns_gpas"):
        h1 = G(h + A(N(h, "N1") * lns))
        return G(h1 + Fm(N(h1, "N_pa") * lns))
    if norm_type == "sandwich_gpas":
        h1 = G(h + N(A(N(h, "N1")), "N_pa"))
        return G(h1 + N(Fm(N(h1, "N_pf")), "N_pff"))
    raise ValueError(norm_type)


def forward(tokens, weights, norm_type, num_layers, heads, groups, post_num=0, lns_fixed=False):
    """Logits [b, s, V] of the reference model."""
    h = weights["embedding"][tokens]
    for l in range(num_layers):
        h = decoder_layer(
            h, weights["layers"][l], norm_type, l, num_layers, post_num, heads, groups, lns_fixed
        )
    return rms_norm(h, weights["final_norm"]) @ weights["lm_head"].T


# --- megatron-core TP=1 state dict → reference weights ---------------------------------------

# Which megatron module holds which of the spec's norms (N1, N_pa, N_pf, N_pff), by layer kind.
PRE_NORMS = {"N1": "input_layernorm", "N_pa": "pre_mlp_layernorm"}
POST_NORMS = {"N_pa": "post_attn_add_layernorm", "N_pff": "post_mlp_add_layernorm"}
SANDWICH_NORMS = {
    "N1": "input_layernorm",
    "N_pa": "post_self_attn_layernorm",
    "N_pf": "pre_mlp_layernorm",
    "N_pff": "post_mlp_layernorm",
}


def norm_map(norm_type, l, post_num):
    if norm_type.startswith("sandwich"):
        return SANDWICH_NORMS
    if norm_type.startswith(("post_pre",)):
        return POST_NORMS if l < post_num else PRE_NORMS
    if norm_type.startswith(("post", "deeppost")):
        return POST_NORMS
    return PRE_NORMS


def split_qkv(qkv, heads, groups):
    """megatron's per-group [q_g | k_g | v_g] rows → separate q, k, v (megatron_notes §4.5)."""
    h = qkv.shape[1]
    d = qkv.shape[0] // (heads + 2 * groups)
    r = heads // groups
    grouped = qkv.view(groups, r + 2, d, h)
    return (
        grouped[:, :r].reshape(heads * d, h),
        grouped[:, r].reshape(groups * d, h),
        grouped[:, r + 1].reshape(groups * d, h),
    )


def from_megatron(model, norm_type, num_layers, heads, groups, post_num=0):
    """Leaf tensors (requires_grad) copied from a TP=1 megatron GPTModel, and a function mapping
    the reference's gradients back onto megatron parameter names."""
    params = dict(model.named_parameters())

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    weights = {
        "embedding": leaf(params["embedding.word_embeddings.weight"]),
        "lm_head": leaf(params["output_layer.weight"]),
        "final_norm": leaf(params["decoder.final_layernorm.weight"]),
        "layers": [],
    }
    for l in range(num_layers):
        p = f"decoder.layers.{l}."
        q, k, v = split_qkv(params[p + "self_attention.linear_qkv.weight"], heads, groups)
        gate, up = params[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        w = {
            "q": leaf(q),
            "k": leaf(k),
            "v": leaf(v),
            "o": leaf(params[p + "self_attention.linear_proj.weight"]),
            "gate": leaf(gate),
            "up": leaf(up),
            "down": leaf(params[p + "mlp.linear_fc2.weight"]),
        }
        for spec_name, module in norm_map(norm_type, l, post_num).items():
            w[spec_name] = leaf(params[p + module + ".weight"])
        if p + "gpas_gate" in params:
            w["gpas_gate"] = leaf(params[p + "gpas_gate"])
        weights["layers"].append(w)

    def grads_by_megatron_name():
        out = {
            "embedding.word_embeddings.weight": weights["embedding"].grad,
            "output_layer.weight": weights["lm_head"].grad,
            "decoder.final_layernorm.weight": weights["final_norm"].grad,
        }
        for l, w in enumerate(weights["layers"]):
            p = f"decoder.layers.{l}."
            d = w["q"].shape[0] // heads
            r = heads // groups
            h = w["q"].shape[1]
            out[p + "self_attention.linear_qkv.weight"] = torch.cat(
                [
                    w["q"].grad.view(groups, r * d, h),
                    w["k"].grad.view(groups, d, h),
                    w["v"].grad.view(groups, d, h),
                ],
                dim=1,
            ).reshape(-1, h)
            out[p + "self_attention.linear_proj.weight"] = w["o"].grad
            out[p + "mlp.linear_fc1.weight"] = torch.cat([w["gate"].grad, w["up"].grad], dim=0)
            out[p + "mlp.linear_fc2.weight"] = w["down"].grad
            for spec_name, module in norm_map(norm_type, l, post_num).items():
                out[p + module + ".weight"] = w[spec_name].grad
            if "gpas_gate" in w:
                out[p + "gpas_gate"] = w["gpas_gate"].grad
        return out

    return weights, grads_by_megatron_name
