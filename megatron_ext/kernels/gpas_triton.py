"""Fused GPAS kernels for CUDA (Triton).

Forward: one read of x and one write of y = c·x, with c = 1 − SiLU(g) computed in fp32 inside
the kernel from the gate's device memory (no host sync). Folded into the residual add (what a
decoder layer uses): one read of the shortcut r and the branch output o and one write of
c·(α·r + o), or of α·(c·r) + o where GPAS sits on a post-norm layer's shortcut.

Backward: the input gradients are the upstream gradient itself (no kernel); the gate gradient
is one fused multiply-reduce of ∂L/∂y ⊙ x (or ∂L/∂y ⊙ (α·r + o)) in fp32 (block partial sums),
then one tiny kernel that adds the partial sums and applies −SiLU′(g), writing the gate's
gradient in its dtype: two launches in all, so the op adds little host-side work per layer.

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
    def fwd_residual(
        r_ptr, o_ptr, gate_ptr, y_ptr, n, alpha, AFTER_ADD: tl.constexpr, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr).to(tl.float32)
        c = 1.0 - g * tl.sigmoid(g)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if AFTER_ADD:
            y = (alpha * r + o) * c
        else:
            y = alpha * (r * c) + o
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_partial_sum_of_two(dy_ptr, r_ptr, o_ptr, part_ptr, n, alpha, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid, tl.sum(dy * (alpha * r + o), axis=0))

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

    return {
        "fwd": fwd,
        "bwd_partial": bwd_partial,
        "bwd_gate": bwd_gate,
        "fwd_residual": fwd_residual,
        "bwd_partial_sum_of_two": bwd_partial_sum_of_two,
    }


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: contiguous CUDA tensors of one dtype."""
    first = tensors[0]
    return available() and all(
        t.is_cuda and t.is_contiguous() and t.dtype == first.dtype and t.shape == first.shape
        for t in tensors
    )


def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y = (1 − SiLU(g))·x in one pass."""
    y = torch.empty_like(x)
    n = x.numel()
    _kernels()["fwd"][(triton_cdiv(n, BLOCK),)](x, gate, y, n, BLOCK=BLOCK)
    return y


def residual_add(
    out: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, alpha: float, after_add: bool
) -> torch.Tensor:
    """One pass over both inputs: c·(α·r + o) (after the add) or α·(c·r) + o (on the shortcut)."""
    y = torch.empty_like(residual)
    n = residual.numel()
    _kernels()["fwd_residual"][(triton_cdiv(n, BLOCK),)](
        residual, out, gate, y, n, float(alpha), AFTER_ADD=after_add, BLOCK=BLOCK
    )
    return y


def gate_grad(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """∂L/∂g = −SiLU′(g)·Σ dy ⊙ x, accumulated in fp32, shaped and typed like ``gate``."""
    n = x.numel()
    partial = torch.empty(triton_cdiv(n, BLOCK), dtype=torch.float32, device=x.device)
    _kernels()["bwd_partial"][(partial.numel(),)](dy.contiguous(), x, partial, n, BLOCK=BLOCK)
    return _gate_from_partials(partial, gate)


def gate_grad_of_sum(
    dy: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, alpha: float
) -> torch.Tensor:
    """∂L/∂g = −SiLU′(g)·Σ dy ⊙ (α·r + o) without materialising α·r + o."""
    n = residual.numel()
    partial = torch.empty(triton_cdiv(n, BLOCK), dtype=torch.float32, device=residual.device)
    _kernels()["bwd_partial_sum_of_two"][(partial.numel(),)](
        dy.contiguous(), residual, out, partial, n, float(alpha), BLOCK=BLOCK
    )
    return _gate_from_partials(partial, gate)


def _gate_from_partials(partial: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Add the block partial sums and apply −SiLU′(g), in one tiny launch."""
    grad = torch.empty_like(gate)
    _kernels()["bwd_gate"][(1,)](partial, partial.numel(), gate, grad, BLOCK=PARTS_BLOCK)
    return grad


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
