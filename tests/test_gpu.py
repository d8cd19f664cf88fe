"""GPU checks (skipped without CUDA): the fused Triton GPAS kernels against the spec's definition
x − SiLU(g)·sg(x), forward values and both gradients, in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _ref(x, g):
    return x - F.silu(g) * x.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g0", [0.0, 0.6, 1.6])
def test_fused_gpas_matches_reference(dtype, g0):
    from megatron_ext.gpas import gpas
    from megatron_ext.kernels import gpas_triton

    assert gpas_triton.available()
    x = torch.randn(256, 4, 1024, device="cuda").to(dtype).requires_grad_()
    g = torch.tensor([g0], device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    y = gpas(x, g)
    c = 1 - F.silu(g.float())
    # bf16: bit-identical to one fp32 multiply rounded once; fp32: within an ulp of c's rounding.
    exact = dtype == torch.bfloat16
    torch.testing.assert_close(
        y, (x.float() * c).to(dtype), rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6
    )
    y.backward(dy)
    assert torch.equal(x.grad, dy)
    x64 = x.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    _ref(x64, g64).backward(dy.double())
    torch.testing.assert_close(
        g.grad.double(), g64.grad, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3
    )
