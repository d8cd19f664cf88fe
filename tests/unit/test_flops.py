"""Model FLOPs per iteration (the MFU numerator) against what a real training step multiplies,
and the GPU peaks (its denominator)."""

import pytest
import torch

from megatron_ext.models.presets import model_preset
from megatron_ext.training.flops import device_peak_tflops, flops_per_iteration


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("query_groups", [4, 2])
def test_flops_formula_counts_what_a_training_step_multiplies(query_groups):
    """torch's FLOP counter on one forward and backward of a real model (megatron-core's local
    attention, which computes the full s×s scores): every dense GEMM is in the formula, and the
    attention matmuls are twice its causal-halved term."""
    from megatron.core.transformer.enums import AttnBackend
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ext.models.gpt import build_model, build_transformer_config

    batch, seq = 2, 32
    cfg = model_preset("tiny4", norm_type="pre_gpas", seq_length=seq, num_query_groups=query_groups)
    tc = build_transformer_config(cfg, use_cpu=True, attention_backend=AttnBackend.local)
    model = build_model(cfg, tc, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    positions = torch.arange(seq).expand(batch, -1)
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten.bmm") + counts.pop("aten.baddbmm")
    dense = counts.pop("aten.mm")
    assert not counts, f"matmuls the formula does not know: {counts}"
    formula = flops_per_iteration(cfg, batch, seq, cfg.padded_vocab_size())
    q = cfg.kv_channels * cfg.num_attention_heads
    causal_half = batch * seq * 6 * cfg.num_layers * q * seq
    assert dense == formula - causal_half
    assert attention == 2 * causal_half


def test_flops_of_the_71m_preset_are_close_to_6_n_per_token():
    """Dense weights dominate at s = 256: roughly 6·N per token, N the layers' weights and the
    output layer."""
    cfg = model_preset("71m")
    h, f, s, V, B = 512, 1368, 256, 32000, 512
    n = 12 * (4 * h * h + 3 * h * f) + V * h
    assert 1.0 < flops_per_iteration(cfg, B, s, V) / (6 * n * B * s) < 1.1


def test_known_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1979.0
    assert device_peak_tflops("Some CPU") is None
