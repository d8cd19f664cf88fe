"""The GPAS op against the spec's definition: forward c·x, identity input-gradient, exact gate
gradient, one saved activation, dtype preserved; and GPAS folded into the residual add, against
the unfused composition written out with the reference's expression."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.gpas import gpas, residual_add_gpas


def reference_gpas(x, g):
    """Spec §2 in the reference's own autograd form: x − SiLU(g)·sg(x)."""
    return x - F.silu(g) * x.detach()


@pytest.mark.parametrize("g0", [0.0, 0.7, -1.2785, 1.9])
def test_forward_is_scaled_input(g0):
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    g = torch.tensor([g0], dtype=torch.float64)
    c = 1.0 - g0 / (1.0 + torch.exp(torch.tensor(-g0, dtype=torch.float64)))
    torch.testing.assert_close(gpas(x, g), c * x, rtol=1e-12, atol=0)


@pytest.mark.parametrize("g0", [0.0, 0.4, 1.6])
def test_input_gradient_is_upstream_gradient_exactly(g0):
    x = torch.randn(4, 2, 16, requires_grad=True)
    g = torch.tensor([g0], requires_grad=True)
    upstream = torch.randn(4, 2, 16)
    gpas(x, g).backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("g0", [0.0, 0.5, -0.8, 1.6])
def test_gate_gradient_matches_finite_differences_and_reference(g0):
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    w = torch.randn(3, 2, 8, dtype=torch.float64)
    g = torch.tensor([g0], dtype=torch.float64, requires_grad=True)
    (gpas(x, g) * w).sum().backward()
    eps = 1e-6
    plus = (gpas(x, torch.tensor([g0 + eps], dtype=torch.float64)) * w).sum()
    minus = (gpas(x, torch.tensor([g0 - eps], dtype=torch.float64)) * w).sum()
    fd = (plus - minus) / (2 * eps)
    assert abs(g.grad.item() - fd.item()) <= 1e-7 * max(1.0, abs(fd.item()))

    g_ref = torch.tensor([g0], dtype=torch.float64, requires_grad=True)
    (reference_gpas(x, g_ref) * w).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad, rtol=1e-12, atol=1e-15)


def test_saves_exactly_one_activation():
    x = torch.randn(8, 2, 32, requires_grad=True)
    g = torch.zeros(1, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gpas(x * 1.0, g)
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(activation_sized) == 1
    assert sum(t.numel() for t in saved) == x.numel() + 1  # the activation and the gate


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_is_input_dtype_and_gate_math_in_fp32(dtype):
    x = torch.randn(4, 4, 64).to(dtype).requires_grad_()
    g = torch.tensor([0.3], dtype=dtype, requires_grad=True)
    y = gpas(x, g)
    assert y.dtype == dtype
    c = 1.0 - F.silu(g.float())
    torch.testing.assert_close(y, (x.float() * c).to(dtype), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.dtype == dtype and g.grad.dtype == dtype


def test_identity_at_init_but_gate_gets_gradient():
    x = torch.randn(6, 1, 8)
    g = torch.zeros(1, requires_grad=True)
    y = gpas(x, g)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    # SiLU'(0) = 0.5, so dL/dg = -0.5 · Σ 2x·x
    torch.testing.assert_close(g.grad, torch.tensor([-0.5 * (2 * x * x).sum().item()]))


def reference_residual_update(o, r, g, alpha, after_add):
    """Spec §2 placements, unfused: G(α·r + o) after the add, α·G(r) + o on the shortcut."""
    if after_add:
        return reference_gpas(alpha * r + o, g)
    return alpha * reference_gpas(r, g) + o


@pytest.mark.parametrize("after_add", [True, False], ids=["after_add", "shortcut"])
@pytest.mark.parametrize("alpha", [1.0, 2.3784])
@pytest.mark.parametrize("g0", [0.0, 0.7, -1.2785])
def test_residual_add_gpas_matches_the_unfused_composition(after_add, alpha, g0):
    gen = torch.Generator().manual_seed(7)
    o = torch.randn(16, 2, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(16, 2, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.tensor([g0], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(16, 2, 24, dtype=torch.float64, generator=gen)
    inputs = (o, r, g)
    y = residual_add_gpas(o, r, g, alpha=alpha, after_add=after_add)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = reference_residual_update(o, r, g, alpha, after_add)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("org", grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    # gradient preservation: the shortcut gets α·dy, the branch dy, neither scaled by c
    assert torch.equal(grads[0], dy)
    torch.testing.assert_close(grads[1], alpha * dy, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("after_add", [True, False], ids=["after_add", "shortcut"])
def test_residual_add_gpas_off_cuda_is_bit_identical_to_the_unfused_layer_math(after_add, dtype):
    """Without the CUDA kernel the folded op runs the unfused add-then-scale (or scale-then-add)
    in the same order and dtypes, so values and gradients match it bit for bit."""
    gen = torch.Generator().manual_seed(3)
    o, r, dy = (torch.randn(64, 3, 40, generator=gen).to(dtype) for _ in range(3))
    alpha = 1.0 if after_add else 1.7

    def run(fold: bool):
        o_, r_ = o.clone().requires_grad_(), r.clone().requires_grad_()
        g = torch.tensor([0.41], dtype=dtype, requires_grad=True)
        if fold:
            y = residual_add_gpas(o_, r_, g, alpha=alpha, after_add=after_add)
        elif after_add:
            y = gpas(r_ + o_, g)
        else:
            y = gpas(r_, g) * alpha + o_
        return (y, *torch.autograd.grad(y, [o_, r_, g], dy))

    for folded, unfused in zip(run(fold=True), run(fold=False), strict=True):
        assert folded.dtype == unfused.dtype and torch.equal(folded, unfused)


@pytest.mark.parametrize("after_add", [True, False], ids=["after_add", "shortcut"])
def test_residual_add_gpas_keeps_one_activation(after_add):
    o = torch.randn(8, 2, 32, requires_grad=True)
    r = torch.randn(8, 2, 32, requires_grad=True)
    g = torch.zeros(1, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        residual_add_gpas(o * 1.0, r * 1.0, g, after_add=after_add)
    # the activation GPAS scales: h = r + o after the add, the shortcut r otherwise
    assert [t.numel() for t in saved if t.numel() > 1] == [r.numel()]
