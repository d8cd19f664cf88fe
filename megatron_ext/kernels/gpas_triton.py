"""Fused GPAS kernels for CUDA (Triton).

Forward: one read of x and one write of y = c·x, with c = 1 − SiLU(g) computed in fp32 inside
the kernel from the gate's device memory (no host sync). Backward: the input gradient is the
upstream gradient itself (no kernel); the gate gradient is one fused multiply-reduce of
∂L/∂y ⊙ x in fp32 (block partial sums, then a tiny final sum).

Imported lazily; :func:`available` says whether Triton and a CUDA device are present.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 4096


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

    return fwd, bwd_partial


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda and x.is_contiguous() and available()


def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y = (1 − SiLU(g))·x in one pass."""
    fwd, _ = _kernels()
    y = torch.empty_like(x)
    n = x.numel()
    fwd[(triton_cdiv(n, BLOCK),)](x, gate, y, n, BLOCK=BLOCK)
    return y


def dot(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ dy ⊙ x accumulated in fp32 (0-dim fp32 tensor)."""
    _, bwd_partial = _kernels()
    n = x.numel()
    blocks = triton_cdiv(n, BLOCK)
    partial = torch.empty(blocks, dtype=torch.float32, device=x.device)
    bwd_partial[(blocks,)](dy.contiguous(), x, partial, n, BLOCK=BLOCK)
    return partial.sum()


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
