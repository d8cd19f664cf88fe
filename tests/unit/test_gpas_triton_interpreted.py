"""The fused Triton GPAS kernels, run by Triton's interpreter on CPU (TRITON_INTERPRET=1, in a
child process), against the spec's definition x − SiLU(g)·sg(x) differentiated by autograd in
float64, alone and folded into the residual add (G(α·r + o), α·G(r) + o). On a GPU machine the
compiled kernels are tested by tests/gpu/test_gpu.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from tests.helpers.gpas_kernels_interpreted import branch_output, case_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# sizes: below one block, several blocks with a ragged end, and (shrunk blocks) more partial
# sums than the final kernel adds per step
CASES = [
    {"n": n, "dtype": dtype, "g0": g0, "seed": i}
    for i, (n, dtype, g0) in enumerate(
        (n, dtype, g0)
        for n in (37, 3 * 4096 + 5)
        for dtype in ("float32", "bfloat16")
        for g0 in (-1.3, 0.0, 0.7)
    )
] + [
    {"n": 8 * 11 + 3, "dtype": "float32", "g0": 0.4, "seed": 99, "block": 8, "parts_block": 4},
    {"n": 3 * 4096 + 5, "dtype": "float32", "g0": -0.3, "seed": 100, "alpha": 2.3784},
    {"n": 3 * 4096 + 5, "dtype": "bfloat16", "g0": 0.9, "seed": 101, "alpha": 2.3784},
]


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "outputs.pt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.helpers.gpas_kernels_interpreted",
            json.dumps(CASES),
            str(out),
        ],
        env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=ROOT,
        check=True,
    )
    return torch.load(out)


def _reference(x, g, dy):
    """Forward value and (∂/∂x, ∂/∂g) of the spec's expression, in float64."""
    x64 = x.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    y = x64 - F.silu(g64) * x64.detach()
    y.backward(dy.double())
    return y.detach(), x64.grad, g64.grad


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: json.dumps(CASES[i]))
def test_kernels_match_the_spec(kernel_outputs, index):
    case = CASES[index]
    x, dy, gate = case_inputs(case["n"], case["dtype"], case["g0"], case["seed"])
    y_ref, dx_ref, dg_ref = _reference(x, gate, dy)
    y, grad = kernel_outputs[index]["y"], kernel_outputs[index]["grad_gate"]
    bf16 = x.dtype == torch.bfloat16
    assert y.dtype == x.dtype and grad.dtype == gate.dtype and grad.shape == gate.shape
    # Within one rounding of the stream's dtype. (Bit-exactness against one fp32 multiply is
    # checked on a GPU: the interpreter was seen rounding fp32 → bf16 toward zero, and its
    # sigmoid differs from torch's in the last fp32 bit.)
    torch.testing.assert_close(y.double(), y_ref, rtol=2**-7 if bf16 else 1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), dg_ref, rtol=1e-2 if bf16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: json.dumps(CASES[i]))
def test_autograd_functions_on_the_kernels_match_the_spec(kernel_outputs, index):
    """gpas() and residual_add_gpas() with their Triton path: the dispatch and the autograd
    wiring (which gradient goes where, the activation gradient passed through unscaled)."""
    case = CASES[index]
    x, dy, gate = case_inputs(case["n"], case["dtype"], case["g0"], case["seed"])
    o = branch_output(x, case["seed"])
    alpha = case.get("alpha", 1.0)
    out = kernel_outputs[index]
    assert out["autograd_kernel_calls"] == 6  # every op below ran on the kernels
    bf16 = x.dtype == torch.bfloat16
    rtol, grad_rtol = (2**-7, 1e-2) if bf16 else (1e-6, 1e-5)
    y_ref, dx_ref, dg_ref = _reference(x, gate, dy)
    y, dx, dg = out["autograd"]["gpas"]
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=0, atol=0)  # ∂L/∂x = ∂L/∂y exactly
    torch.testing.assert_close(dg.double(), dg_ref, rtol=grad_rtol, atol=1e-5)
    r64, o64, dy64 = x.double(), o.double(), dy.double()
    for after_add in (True, False):
        r_ = r64.clone().requires_grad_()
        o_ = o64.clone().requires_grad_()
        g_ = gate.double().clone().requires_grad_()
        if after_add:  # the spec's composition G(α·r + o), written out
            h = alpha * r_ + o_
            want = h - F.silu(g_) * h.detach()
        else:  # α·G(r) + o
            want = alpha * (r_ - F.silu(g_) * r_.detach()) + o_
        want.backward(dy64)
        y, d_o, d_r, d_g = out["autograd"][f"residual_after_add={after_add}"]
        torch.testing.assert_close(y.double(), want.detach(), rtol=rtol, atol=1e-5)
        torch.testing.assert_close(d_o.double(), o_.grad, rtol=0, atol=0)
        torch.testing.assert_close(d_r.double(), r_.grad, rtol=2**-8 if bf16 else 2**-23, atol=0)
        torch.testing.assert_close(d_g.double(), g_.grad, rtol=grad_rtol, atol=1e-4)


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: json.dumps(CASES[i]))
def test_residual_kernels_match_the_spec(kernel_outputs, index):
    case = CASES[index]
    r, dy, gate = case_inputs(case["n"], case["dtype"], case["g0"], case["seed"])
    o = branch_output(r, case["seed"])
    alpha = case.get("alpha", 1.0)
    r64, o64, dy64 = r.double(), o.double(), dy.double()
    after_add, _, dg_ref = _reference(alpha * r64 + o64, gate, dy64)
    shortcut, _, _ = _reference(r64, gate, dy64)
    shortcut = alpha * shortcut + o64
    out = kernel_outputs[index]
    bf16 = r.dtype == torch.bfloat16
    rtol = 2**-7 if bf16 else 1e-6
    for name, want in (("y_after_add", after_add), ("y_shortcut", shortcut)):
        assert out[name].dtype == r.dtype, name
        torch.testing.assert_close(out[name].double(), want, rtol=rtol, atol=1e-5, msg=name)
    grad = out["grad_gate_of_sum"]
    assert grad.dtype == gate.dtype and grad.shape == gate.shape
    torch.testing.assert_close(grad.double(), dg_ref, rtol=1e-2 if bf16 else 1e-5, atol=1e-4)
