import pytest
import torch


@pytest.fixture(scope="session")
def megatron_cpu():
    """Single-process megatron-core parallel state on CPU (TP=PP=DP=1)."""
    from megatron_ext.config import ParallelConfig
    from megatron_ext.platform.distributed import init_distributed

    init_distributed(ParallelConfig(), device="cpu")
    yield


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""):
    """max |actual − expected| ≤ rel · max |expected| (relative to the tensor's scale)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max|Δ| {err:.3e} > {rel:g} × {scale:.3e}"
