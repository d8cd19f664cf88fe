"""``--log-straggler``: every ``--log-interval`` steps, each rank's own compute time (from the
step's start until it reached its gradient reduction, where it starts waiting for the others)
is gathered, and the slowest rank is named when it is slower than the median by more than
``--straggler-threshold``: one warning line, and a ``straggler`` record in the metrics file (and
W&B / TensorBoard) every interval, named or not, so a slow node can be found and drained.

A slow rank makes every rank's step slow alike (the others wait for it in the reduction), so
step times cannot name it; its own compute can. Under pipeline parallelism a stage's compute
includes waiting for its neighbours, so there it points at a stage rather than a rank. Cost:
one all-gather of one number per rank per interval (``bench/bench_faults.py``).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time

import torch

from megatron_ext.config import FaultConfig
from megatron_ext.platform.collectives import collective_device
from megatron_ext.training.contract import Component, RunContext, StepOutcome

logger = logging.getLogger("gpas")


class StragglerReport(Component):
    def __init__(self, cfg: FaultConfig, ctx: RunContext, interval: int):
        self.cfg, self.ctx, self.interval = cfg, ctx, interval
        self.hosts: list[str] = []
        self._seconds, self._steps, self._first = 0.0, 0, None
        self.cost_s = 0.0  # this component's own time in its last report

    def on_start(self, state) -> None:
        self.hosts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(self.hosts, socket.gethostname())

    def after_step(self, step: StepOutcome) -> None:
        compute = step.result.compute_seconds
        self._first = self._first or step.iteration
        if compute is not None:
            self._seconds += compute
            self._steps += 1
        if step.iteration % self.interval == 0:
            self._report(step.iteration)

    def _report(self, iteration: int) -> None:
        t0 = time.perf_counter()
        mine = self._seconds / self._steps if self._steps else float("nan")
        per_rank = _all_gather(mine)
        first, self._first = self._first, None
        self._seconds, self._steps = 0.0, 0
        known = [(s, r) for r, s in enumerate(per_rank) if s == s]  # NaN: no compute measured
        if len(known) < 2:
            return
        median = statistics.median(s for s, _ in known)
        slowest, rank = max(known)
        slowdown = slowest / median - 1 if median > 0 else 0.0
        named = slowdown > self.cfg.straggler_threshold
        self.cost_s = time.perf_counter() - t0
        if not self.ctx.is_logging_rank:
            return
        self.ctx.metrics.write(
            {
                "iteration": iteration,
                "straggler_rank": rank if named else None,
                "slowest_rank": rank,
                "slowest_compute_s": slowest,
                "median_compute_s": median,
                "slowdown": slowdown,
                "straggler_report_s": self.cost_s,
            }
        )
        if named:
            logger.warning(
                "straggler: rank %d on %s computed %.3f s per step over iterations %d-%d, "
                "%.0f%% slower than the median rank (%.3f s); if it persists, drain that node",
                rank, self.hosts[rank], slowest, first, iteration, 100 * slowdown, median,
            )  # fmt: skip


def _all_gather(value: float) -> list[float]:
    device = collective_device()
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    out = torch.empty(torch.distributed.get_world_size(), dtype=torch.float64, device=device)
    torch.distributed.all_gather_into_tensor(out, mine)
    return out.tolist()
