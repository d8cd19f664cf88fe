"""GPU checks (skipped without CUDA): the fused Triton GPAS kernels against the spec's definition
x − SiLU(g)·sg(x), forward values and both gradients, in fp32 and bf16."""

from types import SimpleNamespace

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("after_add,alpha", [(True, 1.0), (False, 1.0), (False, 2.3784)])
def test_fused_residual_gpas_matches_reference(dtype, after_add, alpha):
    from megatron_ext.gpas import residual_add_gpas

    shape = (256, 4, 1024)
    o = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    r = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    g = torch.tensor([0.6], device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device="cuda").to(dtype)
    y = residual_add_gpas(o, r, g, alpha=alpha, after_add=after_add)
    c = 1 - F.silu(g.float())
    rf, of = r.float(), o.float()
    want = (alpha * rf + of) * c if after_add else alpha * (rf * c) + of
    # computed in fp32 and rounded once; fp32 within an ulp of c's rounding
    exact = dtype == torch.bfloat16
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, want.to(dtype), **tol)
    y.backward(dy)
    assert torch.equal(o.grad, dy)
    torch.testing.assert_close(r.grad, (dy * alpha).to(dtype), rtol=0, atol=0)
    o64, r64 = o.detach().double(), r.detach().double()
    g64 = g.detach().double().requires_grad_()
    ref = _ref(alpha * r64 + o64, g64) if after_add else alpha * _ref(r64, g64) + o64
    ref.backward(dy.double())
    torch.testing.assert_close(
        g.grad.double(), g64.grad, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3
    )


def test_profiler_window_sees_the_gpu_kernels(tmp_path):
    """--use-pytorch-profiler on CUDA: the summary counts device kernels (a cuBLAS GEMM), not
    host-side operators, and only for the window's iterations."""
    from megatron_ext.config import ProfileConfig
    from megatron_ext.training.components.profiler import IterationProfiler

    cfg = ProfileConfig(
        profile=True,
        use_pytorch_profiler=True,
        profile_step_start=1,
        profile_step_end=3,
        profile_dir=str(tmp_path),
    )
    ctx = SimpleNamespace(rank=0, device="cuda", run_dir="unused")
    profiler = IterationProfiler(cfg, ctx, say=lambda message: None)
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    for it in range(1, 5):
        profiler.before_step(it)
        a @ a
        torch.cuda.synchronize()
        profiler.after_step(SimpleNamespace(iteration=it))
    text = (tmp_path / "kernels_rank0_iters2-3.txt").read_text()
    gemm = [line.split() for line in text.splitlines() if line.startswith("gemm ")]
    assert gemm and gemm[0][3] == "1"  # one GEMM kernel per iteration
    assert "aten::" not in text
