"""Child process of tests/unit/test_gpas_triton_interpreted.py: runs the fused GPAS kernels under
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before anything imports
triton, hence a fresh process.

    TRITON_INTERPRET=1 python -m tests.helpers.gpas_kernels_interpreted CASES_JSON OUT.pt
"""

import json
import sys

import torch


def case_inputs(n: int, dtype: str, g0: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(n, generator=gen).to(dt)
    dy = torch.randn(n, generator=gen).to(dt)
    return x, dy, torch.tensor([g0], dtype=dt)


def branch_output(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A second activation like x: the branch output o of a residual update."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(x.shape, generator=gen).to(x.dtype)


def _through_autograd(x, o, dy, gate, alpha):
    """The library's autograd Functions (gpas, residual_add_gpas) with the Triton path taken:
    outputs and every input gradient, plus how many kernel calls ran."""
    from megatron_ext.gpas import gpas, residual_add_gpas

    out = {}
    x_ = x.clone().requires_grad_()
    g_ = gate.clone().requires_grad_()
    y = gpas(x_, g_)
    y.backward(dy)
    out["gpas"] = (y.detach(), x_.grad, g_.grad)
    for after_add in (True, False):
        r_, o_ = x.clone().requires_grad_(), o.clone().requires_grad_()
        g_ = gate.clone().requires_grad_()
        y = residual_add_gpas(o_, r_, g_, alpha=alpha, after_add=after_add)
        y.backward(dy)
        out[f"residual_after_add={after_add}"] = (y.detach(), o_.grad, r_.grad, g_.grad)
    return out


def main(cases_json: str, out_path: str) -> None:
    from megatron_ext import gpas as gpas_module
    from megatron_ext.kernels import gpas_triton

    # The interpreter runs the kernels on CPU tensors: take the fused path here, as on CUDA,
    # and count the kernel entry points it reaches.
    calls = {"n": 0}
    for name in ("scale", "gate_grad", "residual_add", "gate_grad_of_sum"):
        kernel = getattr(gpas_triton, name)

        def counted(*args, _kernel=kernel, **kwargs):
            calls["n"] += 1
            return _kernel(*args, **kwargs)

        setattr(gpas_triton, name, counted)
    gpas_module._fused = lambda *tensors: all(t.is_contiguous() for t in tensors)

    results = []
    for case in json.loads(cases_json):
        for name in ("BLOCK", "PARTS_BLOCK"):  # optional shrunk block sizes
            if name.lower() in case:
                setattr(gpas_triton, name, case[name.lower()])
        x, dy, gate = case_inputs(case["n"], case["dtype"], case["g0"], case["seed"])
        o = branch_output(x, case["seed"])
        alpha = case.get("alpha", 1.0)
        results.append(
            {
                "y": gpas_triton.scale(x, gate),
                "grad_gate": gpas_triton.gate_grad(dy, x, gate),
                # folded into the residual add, x playing the shortcut r
                "y_after_add": gpas_triton.residual_add(o, x, gate, alpha, after_add=True),
                "y_shortcut": gpas_triton.residual_add(o, x, gate, alpha, after_add=False),
                "grad_gate_of_sum": gpas_triton.gate_grad_of_sum(dy, x, o, gate, alpha),
            }
        )
        before = calls["n"]
        results[-1]["autograd"] = _through_autograd(x, o, dy, gate, alpha)
        # gpas: scale + gate_grad; each residual placement: residual_add + one gate kernel
        results[-1]["autograd_kernel_calls"] = calls["n"] - before
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
