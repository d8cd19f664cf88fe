"""CPU emulation redirects megatron-core's CUDA call sites (checked against 0.16.1)."""

import megatron.core
import torch

from megatron_ext.platform import cpu_emulation


def test_checked_version_is_the_installed_one():
    assert megatron.core.__version__ == cpu_emulation.CHECKED_MEGATRON_CORE_VERSION


def test_cuda_factories_and_methods_land_on_cpu(megatron_cpu):
    assert cpu_emulation.cpu_emulation_enabled()
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.arange(4)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()


def test_cuda_rng_maps_to_cpu_generator(megatron_cpu):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    torch.cuda.manual_seed(7)
    assert torch.equal(a, torch.rand(3))
    state = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(2))
    with get_cuda_rng_tracker().fork():
        torch.rand(1)


def test_refuses_when_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(cpu_emulation, "_state", {"mode": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        cpu_emulation.enable_cpu_emulation()
    except RuntimeError as err:
        assert "CUDA device is visible" in str(err)
    else:
        raise AssertionError("enable_cpu_emulation ran with a GPU visible")
