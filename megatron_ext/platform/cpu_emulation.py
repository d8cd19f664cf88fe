"""Run megatron-core on CPU by redirecting its CUDA assumptions.

megatron-core is plain torch plus torch.distributed almost everywhere, but a handful of call
sites assume a CUDA device (checked against megatron-core 0.16.1):

1. ``torch.cuda.current_device()`` used as a device for allocations;
2. literal ``device="cuda"`` in factory calls, ``Tensor.cuda()`` and ``Tensor.to("cuda")``;
3. CUDA RNG state handling (``torch.cuda.get_rng_state`` and friends, and the private
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` helpers of ``tensor_parallel.random``);
4. ``torch.cuda.synchronize()``;
5. type checks by string (``grad.type() == 'torch.cuda.FloatTensor'``).

One ``TorchFunctionMode`` covers 1, 2 and 5 for every torch call; plain attribute replacement
covers 3 and 4. ``torch.autograd.backward`` is itself dispatched through the mode, which is
switched off while the mode handles a call; activation recomputation re-runs forward code
inside backward, so the autograd engine is entered with the mode switched on again.
Everything is switched on by :func:`enable_cpu_emulation`, which must run before megatron-core
builds anything and only when the user asked for CPU. It refuses to run where a GPU is visible,
so a GPU job can never be silently moved to CPU.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

#: The megatron-core version whose CUDA call sites this module was checked against.
CHECKED_MEGATRON_CORE_VERSION = "0.16.1"

_CPU = torch.device("cpu")
_state = {"mode": None}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device index means a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device):
    return _CPU if _is_cuda_device(device) else device


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = func(*args, **kwargs)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    torch.cuda.random.get_rng_state = _cpu_rng_state


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state


def _patch_autograd_engine(mode: TorchFunctionMode) -> None:
    run_backward = torch.autograd.graph._engine_run_backward

    def run_backward_emulated(*args, **kwargs):
        if mode in torch.overrides._get_current_function_mode_stack():
            return run_backward(*args, **kwargs)
        with mode:
            return run_backward(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = run_backward_emulated
    torch.autograd._engine_run_backward = run_backward_emulated


def enable_cpu_emulation() -> None:
    """Redirect megatron-core's CUDA call sites to CPU for the rest of the process.

    Idempotent. Raises when a GPU is visible: CPU emulation is for machines without one.
    """
    if _state["mode"] is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "--device cpu was requested but a CUDA device is visible; CPU emulation would hide "
            "the GPU. Drop --device cpu, or hide the GPU with CUDA_VISIBLE_DEVICES=''."
        )
    _patch_torch_cuda()
    _patch_megatron_rng()
    mode = CudaToCpuMode()
    _patch_autograd_engine(mode)
    mode.__enter__()
    _state["mode"] = mode
    logger.info(
        "CPU emulation on (checked against megatron-core %s)", CHECKED_MEGATRON_CORE_VERSION
    )


def cpu_emulation_enabled() -> bool:
    return _state["mode"] is not None
