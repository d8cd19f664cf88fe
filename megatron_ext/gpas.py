"""The GPAS op (Gradient-Preserving Activation Scaling), spec §2.

Forward:  y = c·x with c = 1 − SiLU(g).
Backward: ∂L/∂x = ∂L/∂y unchanged (the gradient is *not* scaled by c), and
          ∂L/∂g = −SiLU′(g) · Σ (∂L/∂y ⊙ x), the exact derivative of the forward map.

The reference writes this as ``x - silu(g) * x.detach()``; a custom autograd Function gives the
same values while saving a single activation (x) for backward, doing the gate math in fp32 and
returning the input dtype (pipeline send/recv buffers are preallocated in that dtype). On CUDA
with Triton the forward is one fused pass and the gate gradient one fused multiply-reduce
(``megatron_ext.kernels.gpas_triton``); elsewhere it falls back to plain torch ops.

Decoder layers use :func:`residual_add_gpas`, GPAS folded into the residual add, so that on
CUDA the op adds no pass over the residual stream in forward.
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


def _scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """c·x in torch ops: multiplied in at least fp32, rounded once to the stream's dtype."""
    math_dtype = _math_dtype(x.dtype)
    c = gpas_scale(gate, math_dtype)
    if x.dtype == math_dtype:
        return x * c
    return (x.to(math_dtype) * c).to(x.dtype)


class _GPASFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        if _fused(x):
            return gpas_triton.scale(x, gate)
        return _scale(x, gate)

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
    g = gate.to(m).reshape(())
    inner = (grad_out.to(m) * x.to(m)).sum()
    return (-silu_derivative(g) * inner).reshape(gate.shape).to(gate.dtype)


def gpas(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Apply GPAS with gate ``gate`` (shape [1]) to activation ``x``."""
    return _GPASFunction.apply(x, gate)


class _ResidualGPASFunction(torch.autograd.Function):
    """GPAS folded into a decoder layer's residual add (``residual_add_gpas``)."""

    @staticmethod
    def forward(ctx, out, residual, gate, alpha: float, after_add: bool):
        ctx.alpha, ctx.after_add = alpha, after_add
        ctx.fused = _fused(residual, out)
        if ctx.fused:
            # One pass, computed in fp32 and rounded once. After the add, backward recomputes
            # α·r + o from both inputs (r is kept by the layer's next norm anyway); on the
            # shortcut it needs r alone, so the branch output is not held.
            ctx.save_for_backward(out if after_add else None, residual, gate)
            return gpas_triton.residual_add(out, residual, gate, alpha, after_add)
        # Elsewhere: the unfused layer's own ops, in its order and dtypes (bit-identical to it),
        # keeping the one activation GPAS scales.
        if after_add:
            h = residual + out if alpha == 1.0 else residual * alpha + out
            ctx.save_for_backward(h, None, gate)
            return _scale(h, gate)
        ctx.save_for_backward(None, residual, gate)
        scaled = _scale(residual, gate)
        return (scaled if alpha == 1.0 else scaled * alpha) + out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        kept, residual, gate = ctx.saved_tensors
        alpha = ctx.alpha
        # Gradient preservation: GPAS passes the gradient through unscaled; only α scales it.
        grad_residual = grad_out if alpha == 1.0 else grad_out * alpha
        grad_gate = None
        if ctx.needs_input_grad[2]:
            if not ctx.after_add:  # ∂L/∂G(r) = α·∂L/∂y, the residual's gradient
                grad_gate = _gate_grad(grad_residual, residual, gate)
            elif ctx.fused:  # kept = o: Σ ∂L/∂y ⊙ (α·r + o) without forming α·r + o
                grad_gate = gpas_triton.gate_grad_of_sum(grad_out, residual, kept, gate, alpha)
            else:  # kept = h = α·r + o
                grad_gate = _gate_grad(grad_out, kept, gate)
        return grad_out, grad_residual, grad_gate, None, None


def residual_add_gpas(
    out: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor,
    *,
    alpha: float = 1.0,
    after_add: bool = True,
) -> torch.Tensor:
    """A decoder layer's residual update with GPAS (spec §2, both placements); one pass on CUDA.

    after_add (pre-norm and Sandwich layers):  y = G(α·r + o)
    on the shortcut (post-norm layers):        y = α·G(r) + o
    where r is the shortcut, o the branch output and G the GPAS op with gate ``gate``. The
    gradients are those of the unfused composition: ∂L/∂o = ∂L/∂y, ∂L/∂r = α·∂L/∂y, and the
    gate's from the one activation GPAS scales.
    """
    return _ResidualGPASFunction.apply(out, residual, gate, float(alpha), bool(after_add))
