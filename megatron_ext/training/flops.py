"""Model FLOPs per iteration, Megatron-LM's formula for a dense GPT (megatron_notes §2.4).

FLOPs/iter = B·s·[6·h·F·e·L + 6·L·(h·(q + 2k) + q·s + q·h) + 6·h·V]

with e = 3 for SwiGLU, q = kv_channels·heads, k = kv_channels·query_groups; the q·s term is the
causal-halved QKᵀ and AV. Norms, softmax, RoPE and GPAS are not counted.
"""

from __future__ import annotations

from megatron_ext.config import ModelConfig

#: Dense peak TFLOP/s used for MFU (per GPU).
PEAK_TFLOPS = {"h100": {"bf16": 989.0, "fp8": 1979.0}, "h200": {"bf16": 989.0, "fp8": 1979.0}}


def flops_per_iteration(
    cfg: ModelConfig, global_batch_size: int, seq_length: int, padded_vocab_size: int
) -> float:
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    q = cfg.kv_channels * cfg.num_attention_heads
    k = cfg.kv_channels * cfg.query_groups
    s = seq_length
    per_token = (
        6 * h * f * 3 * L + 6 * L * (h * (q + 2 * k) + q * s + q * h) + 6 * h * padded_vocab_size
    )
    return float(global_batch_size) * s * per_token


def device_peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak of a known GPU (by name substring), else None."""
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None
