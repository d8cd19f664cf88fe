"""SIGTERM/SIGUSR1 (SLURM preemption) → finish the iteration, save, exit cleanly."""

from __future__ import annotations

import signal

import torch


class ExitSignalHandler:
    """Records that an exit signal arrived; every rank asks :meth:`agreed` at iteration ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, extra: bool = False) -> bool:
        """True on every rank if any rank got a signal (or passed ``extra``); collective."""
        flag = torch.tensor(
            [1 if (self.received or extra) else 0],
            dtype=torch.int32,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
