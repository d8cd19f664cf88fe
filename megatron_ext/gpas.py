"""The GPAS op (Gradient-Preserving Activation Scaling), spec §2.

Forward:  y = c·x with c = 1 − SiLU(g).
Backward: ∂L/∂x = ∂L/∂y unchanged (the gradient is *not* scaled by c), and
          ∂L/∂g = −SiLU′(g) · Σ (∂L/∂y ⊙ x), the exact derivative of the forward map.

The reference writes this as ``x - silu(g) * x.detach()``; a custom autograd Function gives the
same values while saving a single activation (x) for backward, doing the gate math in fp32 and
returning the input dtype (pipeline send/recv buffers are preallocated in that dtype). On CUDA
with Triton the forward is one fused pass and the gate gradient one fused multiply-reduce
(``megatron_ext.kernels.gpas_triton``); elsewhere it falls back to plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.kernels import gpas_triton


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision streams, the stream's own dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def gpas_scale(gate: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """c = 1 − SiLU(g) as a 0-dim tensor, computed in at least fp32."""
    return 1.0 - F.silu(gate.to(_math_dtype(dtype)).reshape(()))


def silu_derivative(g: torch.Tensor) -> torch.Tensor:
    """SiLU′(g) = σ(g)·(1 + g·(1 − σ(g)))."""
    s = torch.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


def _fused(*tensors: torch.Tensor) -> bool:
    return tensors[0].is_cuda and gpas_triton.supports(*tensors)


class _GPASFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        if _fused(x):
            return gpas_triton.scale(x, gate)
        math_dtype = _math_dtype(x.dtype)
        c = gpas_scale(gate, math_dtype)
        if x.dtype == math_dtype:
            return x * c
        # One rounding: multiply in fp32, round once to the stream's dtype.
        return (x.to(math_dtype) * c).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate = ctx.saved_tensors
        grad_gate = _gate_grad(grad_out, x, gate) if ctx.needs_input_grad[1] else None
        # Gradient preservation: the activation gradient passes through unchanged.
        return grad_out, grad_gate


def _gate_grad(grad_out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """∂L/∂g = −SiLU′(g)·Σ ∂L/∂y ⊙ x, summed in at least fp32, shaped and typed like the gate."""
    if _fused(x):
        return gpas_triton.gate_grad(grad_out, x, gate)
    m = _math_dtype(x.dtype)
    return _apply_silu_derivative(grad_out.to(m) * x.to(m), gate)


def _apply_silu_derivative(products: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """−SiLU′(g)·Σ products, in the products' (math) dtype, shaped and typed like the gate."""
    g = gate.to(products.dtype).reshape(())
    return (-silu_derivative(g) * products.sum()).reshape(gate.shape).to(gate.dtype)


def gpas(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Apply GPAS with gate ``gate`` (shape [1]) to activation ``x``."""
    return _GPASFunction.apply(x, gate)


class _ResidualGPASFunction(torch.autograd.Function):
    """GPAS folded into a decoder layer's residual add (``residual_add_gpas``)."""

    @staticmethod
    def forward(ctx, out, residual, gate, alpha: float, after_add: bool):
        ctx.alpha, ctx.after_add = alpha, after_add
        # After the add the gate gradient needs α·r + o; on the shortcut only r (which the
        # layer keeps anyway), so the branch output is not held for backward.
        ctx.save_for_backward(out if after_add else None, residual, gate)
        if _fused(residual, out):
            return gpas_triton.residual_add(out, residual, gate, alpha, after_add)
        m = _math_dtype(residual.dtype)
        c = gpas_scale(gate, m)
        r, o = residual.to(m), out.to(m)
        # The unfused layer's order of operations, so that fp32 results are bit-identical.
        y = (r * alpha + o) * c if after_add else (r * c) * alpha + o
        return y.to(residual.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, residual, gate = ctx.saved_tensors
        alpha = ctx.alpha
        # Gradient preservation: GPAS passes the gradient through unscaled; only α scales it.
        grad_residual = grad_out if alpha == 1.0 else grad_out * alpha
        grad_gate = None
        if ctx.needs_input_grad[2]:
            grad_gate = _residual_gate_grad(grad_out, grad_residual, out, residual, gate, ctx)
        return grad_out, grad_residual, grad_gate, None, None


def _residual_gate_grad(grad_out, grad_residual, out, residual, gate, ctx):
    """−SiLU′(g)·Σ ∂L/∂y ⊙ (α·r + o) after the add; −SiLU′(g)·Σ ∂L/∂G(r) ⊙ r on the shortcut,
    where ∂L/∂G(r) = α·∂L/∂y is the residual's gradient."""
    if not ctx.after_add:
        return _gate_grad(grad_residual, residual, gate)
    if _fused(residual, out):
        return gpas_triton.gate_grad_of_sum(grad_out, residual, out, gate, ctx.alpha)
    m = _math_dtype(residual.dtype)
    return _apply_silu_derivative(grad_out.to(m) * (residual.to(m) * ctx.alpha + out.to(m)), gate)


def residual_add_gpas(
    out: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor,
    *,
    alpha: float = 1.0,
    after_add: bool = True,
) -> torch.Tensor:
    """A decoder layer's residual update with GPAS, in one pass (spec §2, both placements).

    after_add (pre-norm and Sandwich layers):  y = G(α·r + o)
    on the shortcut (post-norm layers):        y = α·G(r) + o
    where r is the shortcut, o the branch output and G the GPAS op with gate ``gate``. The
    gradients are those of the unfused composition: ∂L/∂o = ∂L/∂y, ∂L/∂r = α·∂L/∂y, and the
    gate's from the one activation GPAS scales.
    """
    return _ResidualGPASFunction.apply(out, residual, gate, float(alpha), bool(after_add))
