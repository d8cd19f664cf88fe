import os
import sys

import pytest
import torch

from tests.helpers import cpu_share

# The project's shell scripts run Python as $PYTHON (default python3): hand them this
# interpreter, so that `PYTHON=<venv>/bin/python bash run_tests.sh` needs no activated venv.
os.environ["PYTHON"] = sys.executable

# Under pytest-xdist (run_tests.sh: two workers) each worker and what it starts computes on one
# thread; a multi-process test takes both cores alone (tests/helpers/cpu_share.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The core-sharing lock around a test's whole protocol, so that the module fixtures its
    setup builds (a Slurm cluster's first job, an export's checkpoints) are covered too."""
    with cpu_share.hold(exclusive=item.get_closest_marker("exclusive") is not None):
        yield


@pytest.fixture(scope="session")
def megatron_cpu():
    """Single-process megatron-core parallel state on CPU (TP=PP=DP=1)."""
    from megatron_ext.platform.distributed import ensure_single_process_cpu

    ensure_single_process_cpu()
    yield


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""):
    """max |actual − expected| ≤ rel · max |expected| (relative to the tensor's scale)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max|Δ| {err:.3e} > {rel:g} × {scale:.3e}"


@pytest.fixture(scope="session")
def english_docs():
    from tests.helpers.text_fixtures import english_documents

    docs = english_documents()
    assert len(docs) >= 100
    return docs


@pytest.fixture(scope="session")
def mistral_model():
    from tests.helpers.text_fixtures import mistral_tokenizer_path

    path = mistral_tokenizer_path()
    if path is None:
        pytest.fail(
            "the mistral-common package (pip install mistral-common) provides the real "
            "SentencePiece model these tests use; install the test extras"
        )
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(english_docs, tmp_path_factory):
    from tests.helpers.text_fixtures import train_hf_tokenizer

    return train_hf_tokenizer(english_docs, str(tmp_path_factory.mktemp("hf_tok")))


# --- CI: nothing but the GPU tests may skip ------------------------------------------------------
# With GPAS_NO_SKIPS=1 (set by run_tests.sh, which CI runs) a test that skips without the `gpu`
# mark fails the run: a whole group skipping (Triton or Slurm not installed) must not pass CI
# silently.
_unexpected_skips: list = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller sees every report and decides
    if os.environ.get("GPAS_NO_SKIPS") == "1" and _unexpected_skips:
        print("\nGPAS_NO_SKIPS=1: these tests skipped, which only GPU tests may:")
        for line in _unexpected_skips:
            print(f"  {line}")
        session.exitstatus = 1
