"""Child process of tests/test_gpas_triton_interpreted.py: runs the fused GPAS kernels under
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before anything imports
triton, hence a fresh process.

    TRITON_INTERPRET=1 python -m tests.gpas_kernels_interpreted CASES_JSON OUT.pt
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


def main(cases_json: str, out_path: str) -> None:
    from megatron_ext.kernels import gpas_triton

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
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
