"""Fused GPAS kernels for CUDA (Triton).

Forward: one read of x and one write of y = c·x, with c = 1 − SiLU(g) computed in fp32 inside
the kernel from the gate's device memory (no host sync). Backward: the input gradient is the
upstream gradient itself (no kernel); the gate gradient is one fused multiply-reduce of
∂L/∂y ⊙ x in fp32 (block partial sums), then one tiny kernel that adds the partial sums and
applies −SiLU′(g), writing the gate's gradient in its dtype: two launches in all, so the op
adds little host-side work per layer.

Imported lazily; :func:`available` says whether Triton and a CUDA device are present. With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (how the CPU tests check them).
"""

from __future__ import annotations

import functools

import torch

BLOCK = 4096  # elements per program of the elementwise and partial-sum kernels
PARTS_BLOCK = 1024  # partial sums added per step by the final gate-gradient kernel


@functools.lru_cache(maxsize=1)
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x_ptr, gate_ptr, y_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr).to(tl.float32)
        c = 1.0 - g * tl.sigmoid(g)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x * c).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_partial(dy_ptr, x_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid, tl.sum(dy * x, axis=0))

    @triton.jit
    def bwd_gate(part_ptr, n_parts, gate_ptr, grad_gate_ptr, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_parts, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0)
        inner = tl.sum(acc, axis=0)
        g = tl.load(gate_ptr).to(tl.float32)
        s = tl.sigmoid(g)
        silu_prime = s * (1.0 + g * (1.0 - s))
        tl.store(grad_gate_ptr, (-silu_prime * inner).to(grad_gate_ptr.dtype.element_ty))

    return fwd, bwd_partial, bwd_gate


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda and x.is_contiguous() and available()


def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y = (1 − SiLU(g))·x in one pass."""
    fwd, _, _ = _kernels()
    y = torch.empty_like(x)
    n = x.numel()
    fwd[(triton_cdiv(n, BLOCK),)](x, gate, y, n, BLOCK=BLOCK)
    return y


def gate_grad(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """∂L/∂g = −SiLU′(g)·Σ dy ⊙ x, accumulated in fp32, shaped and typed like ``gate``."""
    _, bwd_partial, bwd_gate = _kernels()
    n = x.numel()
    blocks = triton_cdiv(n, BLOCK)
    partial = torch.empty(blocks, dtype=torch.float32, device=x.device)
    bwd_partial[(blocks,)](dy.contiguous(), x, partial, n, BLOCK=BLOCK)
    grad = torch.empty_like(gate)
    bwd_gate[(1,)](partial, blocks, gate, grad, BLOCK=PARTS_BLOCK)
    return grad


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
