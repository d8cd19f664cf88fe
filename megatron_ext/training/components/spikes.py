"""Loss and gradient-norm spikes: a step whose loss or global grad norm is more than
``--spike-threshold`` standard deviations above the mean of the last ``--spike-window`` steps
(OLMo-core's rule, 6σ over 128 steps by default).

Every spike is logged (a warning line, a ``spike`` record in the metrics file and its sinks) and
counted; with ``--skip-spiky-steps`` its update is skipped, as a NaN step's is.
Spikes and non-finite values stay out of the window, so one spike does not widen the band for
the next. The window is the monitor's checkpointed state: a resumed run judges the next step
exactly as the uninterrupted run would. Every rank sees the same loss and grad norm, so every
rank makes the same decision.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from megatron_ext.config import SpikeConfig
from megatron_ext.metrics_file import SpikeRecord
from megatron_ext.training.contract import Component, StepOutcome

logger = logging.getLogger("gpas")

MIN_HISTORY = 16  # steps in the window before anything is judged
METRICS = ("loss", "grad_norm")


@dataclass(frozen=True)
class SpikeVerdict:
    """What one step's values were judged: the metrics that spiked and by how much."""

    sigmas: dict  # metric -> standard deviations above the window's mean
    band: dict  # metric -> (mean, std) of the window

    def __bool__(self) -> bool:
        return bool(self.sigmas)


class SpikeMonitor(Component):
    state_key = "spikes"

    def __init__(self, cfg: SpikeConfig, ctx):
        self.cfg = cfg
        self.metrics = ctx.metrics
        self.windows = {m: deque(maxlen=cfg.spike_window) for m in METRICS}
        self.total = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.spike_threshold > 0

    def judge(self, loss: Optional[float], grad_norm: Optional[float]) -> SpikeVerdict:
        """Whether these values are a spike against the current window (no state change)."""
        sigmas, band = {}, {}
        if not self.enabled:
            return SpikeVerdict(sigmas, band)
        for name, value in zip(METRICS, (loss, grad_norm), strict=True):
            window = self.windows[name]
            if value is None or not math.isfinite(value) or len(window) < MIN_HISTORY:
                continue
            mean = sum(window) / len(window)
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / (len(window) - 1))
            band[name] = (mean, std)
            deviation = (value - mean) / std if std > 0 else (math.inf if value > mean else 0.0)
            if deviation > self.cfg.spike_threshold:
                sigmas[name] = deviation
        return SpikeVerdict(sigmas, band)

    def may_apply_update(self, loss: Optional[float], grad_norm: float) -> bool:
        """Under ``--skip-spiky-steps``, no update for a spike."""
        return not (self.cfg.skip_spiky_steps and self.judge(loss, grad_norm))

    def after_step(self, step: StepOutcome) -> None:
        """Judge the finished step, report a spike, add ordinary values to the window."""
        if not self.enabled:
            return
        result = step.result
        loss, grad_norm = result.loss, result.grad_norm
        verdict = self.judge(loss, grad_norm)
        if verdict:
            self.total += 1
            self._report(step.iteration, loss, grad_norm, verdict, result.rejected)
        else:
            for name, value in zip(METRICS, (loss, grad_norm), strict=True):
                if value is not None and math.isfinite(value):
                    self.windows[name].append(float(value))
        step.record_metric("spikes_total", self.total)

    def state_dict(self) -> dict:
        return {"total": self.total, **{m: list(w) for m, w in self.windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", 0))
        for m in METRICS:
            self.windows[m] = deque(state.get(m, []), maxlen=self.cfg.spike_window)

    def _report(self, iteration, loss, grad_norm, verdict: SpikeVerdict, skipped: bool) -> None:
        values = {"loss": loss, "grad_norm": grad_norm}
        parts = [
            f"{name} {values[name]:.4g} is {s:.1f}σ above the mean of the last "
            f"{len(self.windows[name])} steps ({verdict.band[name][0]:.4g} ± "
            f"{verdict.band[name][1]:.2g})"
            for name, s in verdict.sigmas.items()
        ]
        action = "update skipped" if skipped else "update applied"
        logger.warning("spike at iteration %d: %s; %s", iteration, "; ".join(parts), action)
        record = SpikeRecord(
            iteration=iteration,
            spike=sorted(verdict.sigmas),
            spike_loss=loss,
            spike_grad_norm=grad_norm,
            spike_sigmas=max(verdict.sigmas.values()),
            spike_skipped=skipped,
            spikes_total=self.total,
        )
        self.metrics.write(record.as_dict())
