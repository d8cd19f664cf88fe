"""The fused Triton GPAS kernels, run by Triton's interpreter on CPU (TRITON_INTERPRET=1), against
the spec's definition x − SiLU(g)·sg(x) differentiated by autograd in float64.

On a GPU machine the compiled kernels are tested by tests/test_gpu.py instead.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py covers CUDA"),
]


@pytest.fixture
def kernels(monkeypatch):
    from megatron_ext.kernels import gpas_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gpas_triton._kernels.cache_clear()
    yield gpas_triton
    gpas_triton._kernels.cache_clear()


def _reference(x, g, dy):
    """Forward value and (∂/∂x, ∂/∂g) of the spec's expression, in float64."""
    x64 = x.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    y = x64 - F.silu(g64) * x64.detach()
    y.backward(dy.double())
    return y.detach(), x64.grad, g64.grad


# sizes: below one block, and several blocks with a ragged end
@pytest.mark.parametrize("n", [37, 3 * 4096 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g0", [-1.3, 0.0, 0.7])
def test_kernels_match_the_spec(kernels, n, dtype, g0):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(dtype)
    dy = torch.randn(n, generator=gen).to(dtype)
    gate = torch.tensor([g0], dtype=dtype)
    y_ref, dx_ref, dg_ref = _reference(x, gate, dy)

    y = kernels.scale(x, gate)
    assert y.dtype == dtype
    # Within one rounding of the stream's dtype. (Bit-exactness against one fp32 multiply is
    # checked on a GPU: the interpreter was seen rounding fp32 → bf16 toward zero, and its sigmoid
    # differs from torch's in the last fp32 bit.)
    torch.testing.assert_close(
        y.double(), y_ref, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6
    )

    grad = kernels.gate_grad(dy, x, gate)
    assert grad.shape == gate.shape and grad.dtype == dtype
    rel = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double(), dg_ref, rtol=rel, atol=1e-5)
    assert torch.equal(dx_ref, dy.double())  # the spec's activation gradient is dy itself


def test_final_reduction_loops_over_many_partial_sums(kernels, monkeypatch):
    """More partial sums than the final kernel adds per step (shrunk blocks: interpreting
    4096 × 1024 elements would be slow)."""
    monkeypatch.setattr(kernels, "BLOCK", 8)
    monkeypatch.setattr(kernels, "PARTS_BLOCK", 4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * 11 + 3, generator=gen)  # 12 partial sums, added 4 at a time
    dy = torch.randn(x.numel(), generator=gen)
    gate = torch.tensor([0.4])
    _, _, dg_ref = _reference(x, gate, dy)
    torch.testing.assert_close(
        kernels.gate_grad(dy, x, gate).double(), dg_ref, rtol=1e-5, atol=1e-6
    )
