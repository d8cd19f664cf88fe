"""The GPAS op (Gradient-Preserving Activation Scaling), spec §2.

Forward:  y = c·x with c = 1 − SiLU(g).
Backward: ∂L/∂x = ∂L/∂y unchanged (the gradient is *not* scaled by c), and
          ∂L/∂g = −SiLU′(g) · Σ (∂L/∂y ⊙ x), the exact derivative of the forward map.

The reference writes this as ``x - silu(g) * x.detach()``; a custom autograd Function gives the
same values while saving a single activation (x) for backward, doing the gate math in fp32 and
returning the input dtype (pipeline send/recv buffers are preallocated in that dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gpas_scale(gate: torch.Tensor) -> torch.Tensor:
    """c = 1 − SiLU(g), computed in fp32. Returns a 0-dim fp32 tensor."""
    return 1.0 - F.silu(gate.float().reshape(()))


def silu_derivative(g: torch.Tensor) -> torch.Tensor:
    """SiLU′(g) = σ(g)·(1 + g·(1 − σ(g)))."""
    s = torch.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


class _GPASFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        c = gpas_scale(gate)
        if x.dtype == torch.float32:
            return x * c
        # One rounding: multiply in fp32, round once to the stream's dtype.
        return (x.float() * c).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate = ctx.saved_tensors
        grad_gate = None
        if ctx.needs_input_grad[1]:
            g = gate.float().reshape(())
            if x.dtype == torch.float32 and grad_out.dtype == torch.float32:
                inner = torch.dot(grad_out.reshape(-1), x.reshape(-1))
            else:
                inner = torch.dot(grad_out.reshape(-1).float(), x.reshape(-1).float())
            grad_gate = (-silu_derivative(g) * inner).reshape(gate.shape).to(gate.dtype)
        # Gradient preservation: the activation gradient passes through unchanged.
        return grad_out, grad_gate


def gpas(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Apply GPAS with gate ``gate`` (shape [1]) to activation ``x``."""
    return _GPASFunction.apply(x, gate)
