from megatron_ext.models.presets import model_preset
from megatron_ext.training.flops import device_peak_tflops, flops_per_iteration


def test_flops_formula_by_hand():
    # 71m: h 512, F 1368, L 12, 8 heads of 64, MHA, vocab 32000, s 256, B 512.
    cfg = model_preset("71m")
    h, f, L, s, V, B = 512, 1368, 12, 256, 32000, 512
    mlp = 6 * h * f * 3 * L
    attn = 6 * L * (h * (512 + 2 * 512) + 512 * s + 512 * h)
    head = 6 * h * V
    assert flops_per_iteration(cfg, B, s, V) == B * s * (mlp + attn + head)
    # Dense params dominate: roughly 6·N·tokens with N the non-embedding + head weights.
    n = 12 * (4 * h * h + 3 * h * f) + V * h
    assert 1.0 < flops_per_iteration(cfg, B, s, V) / (6 * n * B * s) < 1.1


def test_known_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1979.0
    assert device_peak_tflops("Some CPU") is None
