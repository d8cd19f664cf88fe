"""A run's ``metrics.jsonl``: the records the trainer writes and the one reader every tool uses.

One JSON object per line, appended as the run goes: a step record per log interval, a
validation record per evaluation, a telemetry record per telemetry interval, a spike record per
loss or grad-norm spike. A resumed run
repeats the iterations after its last checkpoint (the later record wins), and a run killed
while writing leaves a line cut short, followed by the resumed run's lines: the reader skips
such lines and lists them (:attr:`MetricsFile.unreadable`), so every tool treats them alike.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

METRICS_FILE = "metrics.jsonl"


@dataclass
class StepRecord:
    """One log interval of training (means over the interval where it says so)."""

    iteration: int
    consumed_samples: int
    lm_loss: Optional[float]
    lr: float
    grad_norm: Optional[float]
    gate_grad_norm: Optional[float]
    tokens_per_s: float  # over the interval
    step_time_s: float  # mean over the interval
    skipped_iterations: int = 0  # in the whole run
    gate_scale_mean: Optional[float] = None  # GPAS types only
    gate_scale_min: Optional[float] = None
    gate_scale_max: Optional[float] = None
    gpas_scales: Optional[list] = None  # c_l per layer, first layer first
    tflops: Optional[float] = None  # GPU only: per GPU
    mfu: Optional[float] = None
    mem_gib: Optional[float] = None
    spikes_total: Optional[int] = None  # in the whole run, with spike detection on
    no_loss_iterations: Optional[int] = None  # in the whole run: batches no token had loss in

    _OPTIONAL = ("gate_scale_mean", "gate_scale_min", "gate_scale_max", "gpas_scales",
                 "tflops", "mfu", "mem_gib", "spikes_total", "no_loss_iterations")  # fmt: skip

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if not (k in self._OPTIONAL and v is None)}


@dataclass
class ValidationRecord:
    iteration: int
    val_loss: Optional[float]  # None: no validation data reached this rank
    val_ppl: Optional[float]
    val_tokens: int
    val_batches: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TelemetryRecord:
    iteration: int
    telemetry: list  # one row per layer (``training/components/telemetry.py``)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SpikeRecord:
    """A step whose loss or grad norm left the rolling band (``training/components/spikes.py``)."""

    iteration: int
    spike: list  # which of "loss", "grad_norm"
    spike_loss: Optional[float]
    spike_grad_norm: Optional[float]
    spike_sigmas: float  # the largest deviation, in standard deviations
    spike_skipped: bool  # its update was skipped (--skip-spiky-steps)
    spikes_total: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MetricsFile:
    """Every readable record of one metrics file, in file order."""

    path: str
    records: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # 1-based line numbers skipped

    @classmethod
    def read(cls, path: str) -> MetricsFile:
        out = cls(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                record = _parse(line)
                if record is not None:
                    out.records.append(record)
                elif line.strip():
                    out.unreadable.append(number)
        return out

    def unreadable_note(self) -> Optional[str]:
        if not self.unreadable:
            return None
        lines = ", ".join(str(n) for n in self.unreadable[:5])
        more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
        return (
            f"{self.path}:{lines}{more}: skipped {len(self.unreadable)} line(s) that are not "
            "JSON records (a run killed while writing leaves one)"
        )

    def _curve(self, key: str) -> list[tuple[int, float]]:
        values = {r["iteration"]: r[key] for r in self.records if r.get(key) is not None}
        return sorted(values.items())

    def train_losses(self) -> list[tuple[int, float]]:
        """(iteration, lm_loss), one per iteration (a resumed run's later record wins)."""
        return self._curve("lm_loss")

    def validation_losses(self) -> list[tuple[int, float]]:
        return self._curve("val_loss")

    def spikes(self) -> list[dict]:
        return [r for r in self.records if r.get("spike")]

    def telemetry(self) -> list[tuple[int, list]]:
        return [(r["iteration"], r["telemetry"]) for r in self.records if r.get("telemetry")]

    def validation_at(self, iteration: int) -> Optional[dict]:
        """The last validation record at ``iteration`` (None: there is none)."""
        found = None
        for r in self.records:
            if r.get("val_loss") is not None and r.get("iteration") == iteration:
                found = r
        return found

    def last_value(self, key: str):
        """The last non-empty value of ``key`` (e.g. ``gpas_scales``), or None."""
        for r in reversed(self.records):
            if r.get(key):
                return r[key]
        return None


def last_iteration(path: str, tail_bytes: int = 4096) -> int:
    """The last iteration logged (0: none yet), from the file's tail only: cheap enough to poll
    while the run writes."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        record = _parse(line)
        if record is not None and isinstance(record.get("iteration"), int):
            return record["iteration"]
    return 0


def _parse(line: str) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "iteration" in record else None
