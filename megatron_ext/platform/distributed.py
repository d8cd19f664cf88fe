"""Process-group setup for one process or a torchrun/SLURM job, on CPU (gloo) or GPU (nccl)."""

from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_ext.config import ParallelConfig
from megatron_ext.platform.cpu_emulation import enable_cpu_emulation


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in its workers


def _attempt_store(rank: int, world_size: int, timeout) -> Optional[dist.Store]:
    """Under torchrun, the rendezvous store seen through a prefix naming this attempt.

    torchrun keeps one store for the whole job, and workers it restarts (``--max-restarts``)
    find the keys of the attempt before: the process-group keys of the earlier workers, whose
    addresses are dead, so the new group often fails to connect ("connectFullMesh failed").
    Keys under the attempt's own prefix start empty. None outside torchrun (the default
    env:// rendezvous is then the same thing)."""
    attempt = os.environ.get(RESTART_COUNT)
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"gpas/attempt{attempt}/", store)


def init_distributed(
    parallel: ParallelConfig,
    *,
    device: str = "cuda",
    num_layers: Optional[int] = None,
    seed: int = 1234,
) -> None:
    """Initialize torch.distributed from the environment and megatron-core's parallel state.

    Without RANK/WORLD_SIZE in the environment it runs as a single process. ``device="cpu"``
    switches on CPU emulation and the gloo backend.
    """
    if device == "cpu":
        enable_cpu_emulation()
    timeout_minutes = parallel.distributed_timeout_minutes
    launched = "WORLD_SIZE" in os.environ  # torchrun, srun wrapper or our test harness
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A single process not started by a launcher gets a private port, so that several
        # such runs (or a stale MASTER_PORT in the environment) cannot collide.
        init_method = None if launched else f"tcp://127.0.0.1:{free_port()}"
        if launched:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _attempt_store(rank, world_size, timeout) if launched else None
        dist.init_process_group(
            backend="gloo" if device == "cpu" else "nccl",
            init_method=None if store is not None else init_method,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    vpp = (
        parallel.virtual_pipeline_model_parallel_size(num_layers)
        if num_layers is not None
        else None
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def ensure_single_process_cpu() -> None:
    """A TP=PP=DP=1 megatron-core state on CPU, unless one is already initialized."""
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(), device="cpu")
