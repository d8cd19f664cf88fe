"""Profiling a window of training iterations, with Megatron-LM's flags.

``--profile`` profiles iterations ``start + 1`` … ``end`` (1-based, Megatron-LM's counting) on
``--profile-ranks``. With ``--use-pytorch-profiler`` each profiled rank writes a Chrome trace
(open it in Perfetto or chrome://tracing) and a kernel summary: how busy the device was and
which kinds of kernels filled the iterations (:mod:`megatron_ext.training.kernel_profile`).
The iteration before the window, when there is one (and the run did not resume right at the
window), runs under the profiler unrecorded, so the profiler's start-up cost stays out of the
trace. Without it the window is bracketed by
``cudaProfilerStart``/``cudaProfilerStop`` with one NVTX range per iteration, for
``nsys profile --capture-range=cudaProfilerApi``. Profiled iterations run slower than the
others; their logged step times include the profiler's cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from megatron_ext import fileio
from megatron_ext.config import ProfileConfig
from megatron_ext.training.contract import Component
from megatron_ext.training.kernel_profile import device_events, summarize


class IterationProfiler(Component):
    """Called around every iteration; does nothing outside the window or off the chosen ranks.
    Its messages (a window written, a window skipped) go to ``say``: every profiled rank has
    its own."""

    def __init__(self, cfg: ProfileConfig, ctx, say: Callable[[str], None] = print):
        """``ctx``: the run's :class:`RunContext` (its rank, device and run directory; profiles
        go under ``<run dir>/profile`` unless ``--profile-dir`` says otherwise)."""
        self.say = say
        rank, device = ctx.rank, ctx.device
        out_dir = os.path.join(ctx.run_dir, "profile")
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.torch_profiler = cfg.use_pytorch_profiler
        self.start, self.end = cfg.profile_step_start, cfg.profile_step_end
        self.rank, self.device = rank, device
        self.out_dir = cfg.profile_dir or out_dir
        self._prof = None
        self._nsys_running = False
        self._recorded = 0  # iterations of the window run so far
        self.written: list[str] = []

    def on_start(self, state) -> None:
        """A window that began before the first iteration a (resumed) run makes is not
        profiled, and the message says so."""
        completed = state.iteration
        if self.enabled and completed > self.start:
            self.enabled = False
            self.say(
                f"rank {self.rank}: --profile window {self.start + 1}-{self.end} starts before "
                f"the resumed iteration {completed + 1}; not profiling"
            )

    @property
    def stem(self) -> str:
        return f"rank{self.rank}_iters{self.start + 1}-{self.end}"

    def before_step(self, iteration: int) -> None:
        completed = iteration - 1
        if not self.enabled:
            return
        if self.torch_profiler:
            if self._prof is None and self.start - 1 <= completed <= self.start:
                self._start_torch_profiler(warmup=self.start - completed)
        elif completed == self.start:
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_running = True
        if self._nsys_running:
            torch.cuda.nvtx.range_push(f"iteration {completed + 1}")

    def after_step(self, step) -> None:
        completed = step.iteration
        if self._nsys_running:
            torch.cuda.nvtx.range_pop()
            if completed == self.end:
                torch.cuda.cudart().cudaProfilerStop()
                self._nsys_running = False
                self.say(f"rank {self.rank}: cudaProfilerStop after iteration {completed}")
            return
        if self._prof is None:
            return
        if completed > self.start:
            self._recorded += 1
        self._prof.step()
        if completed == self.end:
            self.say(self._stop_torch_profiler())

    def close(self) -> None:
        """Stop a window the run left early (exit signal, time limit): keep what it recorded."""
        if self._nsys_running:
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys_running = False
            self.say(f"rank {self.rank}: cudaProfilerStop (the run ended inside the window)")
        elif self._prof is not None:
            self.say(self._stop_torch_profiler())

    # -- torch.profiler ----------------------------------------------------------------------
    def _start_torch_profiler(self, warmup: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=warmup, active=self.end - self.start, repeat=1),
            on_trace_ready=self._write,
        )
        self._prof.start()

    def _stop_torch_profiler(self) -> str:
        prof, self._prof = self._prof, None
        prof.stop()  # flushes a window cut short through on_trace_ready
        if not self.written:
            return f"rank {self.rank}: the run ended before any profiled iteration completed"
        return f"rank {self.rank}: profile written to " + ", ".join(self.written)

    def _write(self, prof) -> None:
        """Trace and kernel summary, each written under a temporary name and renamed."""
        if self.written or not self._recorded:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"trace_{self.stem}.json")
        with fileio.atomic_path(trace) as tmp:
            prof.export_chrome_trace(tmp)
        iterations = self._recorded
        wall_ms = _recorded_span_us(prof) / 1e3 / iterations
        header = (
            f"iterations {self.start + 1}-{self.start + iterations} on rank {self.rank} "
            f"({self.device}): everything the rank ran in the window (an evaluation or a "
            "checkpoint inside it too), per iteration\n"
        )
        report = header + summarize(device_events(prof, self.device), iterations, wall_ms) + "\n"
        summary = os.path.join(self.out_dir, f"kernels_{self.stem}.txt")
        fileio.write_text(summary, report)
        self.written = [trace, summary]


def _recorded_span_us(prof) -> float:
    """Wall time the profiler recorded: the sum of its per-step annotations."""
    return sum(
        e.time_range.end - e.time_range.start
        for e in prof.events()
        if e.name.startswith("ProfilerStep")
    )
