"""Where a training step's GPU time goes: kernels grouped by kind, GPU busy share, top kernels.

Reads torch.profiler's device events (name, start, end in µs) and answers the two questions a
throughput number leaves open: is the GPU busy (or waiting on the host), and which kernels
fill it. Used by ``pretrain_gpas.py --profile --use-pytorch-profiler`` (a summary next to the
trace) and ``bench/bench_throughput.py --profile FILE``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

# First match wins; attention before GEMM (cuDNN attention kernels mention gemm-like tiles).
CATEGORIES = (
    ("attention", r"fmha|flash|sdpa|attn|attention|softmax_fprop|dot_product"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|wgmma|cublas|matmul|^aten::(mm|bmm|addmm|baddbmm)$"),
    ("norm", r"norm"),
    ("optimizer", r"adam|multi_tensor|l2norm|sgd"),
    ("loss", r"cross_entropy|log_softmax|logsoftmax|nll|softmax"),
    ("rope", r"rope|rotary"),
    ("fp8 cast/amax", r"fp8|amax|quantize|cast_transpose|scale_inv"),
    ("copy/fill", r"copy|memcpy|memset|fill|cat_|catarray|index"),
    ("triton (fused)", r"^triton|^fwd$|^bwd_partial$|^bwd_gate$"),
    ("elementwise/reduce", r"elementwise|vectorized|unrolled|reduce|silu|mul|add"),
)


@dataclass
class KernelEvent:
    name: str
    start_us: float
    end_us: float

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def busy_us(events: list[KernelEvent]) -> float:
    """Length of the union of the kernels' intervals (overlapping streams counted once)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_us):
        if e.start_us > end:
            total += e.duration_us
            end = e.end_us
        elif e.end_us > end:
            total += e.end_us - end
            end = e.end_us
    return total


def summarize(events: list[KernelEvent], iterations: int, wall_ms: float, top: int = 25) -> str:
    """A text report per iteration: busy share, time per category, the top kernels."""
    per_iter = 1e-3 / iterations  # µs over all iterations → ms per iteration
    kernel_ms = sum(e.duration_us for e in events) * per_iter
    busy_ms = busy_us(events) * per_iter
    lines = [
        f"wall {wall_ms:.1f} ms/iter; device busy {busy_ms:.1f} ms ({busy_ms / wall_ms:.1%}), "
        f"idle {wall_ms - busy_ms:.1f} ms; {len(events) / iterations:.0f} kernels/iter, "
        f"kernel time {kernel_ms:.1f} ms",
        "",
        f"{'category':<22}{'ms/iter':>10}{'share':>8}{'kernels/iter':>14}",
    ]
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        for table, key in ((by_cat, category(e.name)), (by_name, e.name)):
            table[key][0] += e.duration_us
            table[key][1] += 1
    for label, (us, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"{label:<22}{us * per_iter:>10.2f}{us * per_iter / kernel_ms:>8.1%}"
            f"{n / iterations:>14.0f}"
        )
    lines += ["", f"top {top} kernels: ms/iter, share, calls/iter, mean µs, name"]
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(
            f"{us * per_iter:>9.2f} {us * per_iter / kernel_ms:>6.1%} {n / iterations:>6.0f} "
            f"{us / n:>9.1f}  {name[:110]}"
        )
    return "\n".join(lines)


def device_events(prof, device: str = "cuda") -> list[KernelEvent]:
    """The kernels of a finished torch.profiler.profile: GPU kernels (and memcpy/memset) on
    CUDA; on CPU the outermost ATen operators (an ``aten::matmul`` counts once, not again
    for the ``aten::mm`` inside it)."""
    import torch

    if device == "cuda":
        wanted = torch.autograd.DeviceType.CUDA
        keep = [e for e in prof.events() if e.device_type == wanted]
    else:

        def outermost_aten(e) -> bool:
            parent = e.cpu_parent
            return e.name.startswith("aten::") and not (
                parent is not None and parent.name.startswith("aten::")
            )

        keep = [e for e in prof.events() if outermost_aten(e)]
    return [KernelEvent(e.name, e.time_range.start, e.time_range.end) for e in keep]
