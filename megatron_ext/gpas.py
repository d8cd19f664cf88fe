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


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and gpas_triton.supports(x)


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
        grad_gate = None
        if ctx.needs_input_grad[1] and _fused(x):
            grad_gate = gpas_triton.gate_grad(grad_out, x, gate)
        elif ctx.needs_input_grad[1]:
            math_dtype = _math_dtype(x.dtype)
            g = gate.to(math_dtype).reshape(())
            inner = (grad_out.to(math_dtype) * x.to(math_dtype)).sum()
            grad_gate = (-silu_derivative(g) * inner).reshape(gate.shape).to(gate.dtype)
        # Gradient preservation: the activation gradient passes through unchanged.
        return grad_out, grad_gate


def gpas(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Apply GPAS with gate ``gate`` (shape [1]) to activation ``x``."""
    return _GPASFunction.apply(x, gate)
