"""The spike rule against a plain re-derivation: mean and sample standard deviation of the
window, a spike beyond the threshold, spikes kept out of the window, the state round-trip."""

import math
import random
import statistics
from types import SimpleNamespace

import pytest

from megatron_ext.config import SpikeConfig
from megatron_ext.training.components.spikes import MIN_HISTORY, SpikeMonitor
from megatron_ext.training.contract import StepOutcome


class _Sink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def _monitor(cfg, sink=None):
    return SpikeMonitor(cfg, SimpleNamespace(metrics=sink or _Sink()))


def _step(monitor, state, loss, grad_norm, rejected=False):
    """One step through the monitor's hook; the verdict it reached (judged before the hook
    changes the window)."""
    state.iteration += 1
    verdict = monitor.judge(loss, grad_norm)
    result = SimpleNamespace(loss=loss, grad_norm=grad_norm, rejected=rejected)
    step = StepOutcome(state.iteration, result, lr=0.0, seconds=0.0, consumed_samples=0)
    monitor.after_step(step)
    state.report = step.metrics
    return verdict


def _state():
    return SimpleNamespace(iteration=0, report={})


def test_judgement_matches_a_plain_mean_and_sample_std():
    rng = random.Random(0)
    monitor = _monitor(SpikeConfig(spike_threshold=3.0, spike_window=32))
    state = _state()
    losses = [3.0 + rng.gauss(0, 0.1) for _ in range(50)]
    for x in losses:
        _step(monitor, state, x, 1.0 + rng.gauss(0, 0.05))
    window = losses[-32:]  # the last 32 ordinary values
    mean, std = statistics.mean(window), statistics.stdev(window)
    below, above = mean + 2.9 * std, mean + 3.1 * std
    assert not monitor.judge(below, None)
    verdict = monitor.judge(above, None)
    assert list(verdict.sigmas) == ["loss"]
    assert verdict.sigmas["loss"] == pytest.approx((above - mean) / std, rel=1e-9)


def test_a_spike_is_reported_counted_and_kept_out_of_the_window():
    sink = _Sink()
    monitor = _monitor(SpikeConfig(spike_threshold=6.0), sink)
    state = _state()
    for i in range(40):
        _step(monitor, state, 2.0 + 0.01 * (i % 3), 0.5 + 0.01 * (i % 5))
    before = monitor.state_dict()
    verdict = _step(monitor, state, 2.0, 50.0, rejected=True)
    assert list(verdict.sigmas) == ["grad_norm"]
    (record,) = sink.records
    assert record["iteration"] == 41 and record["spike"] == ["grad_norm"]
    assert record["spike_skipped"] is True and record["spikes_total"] == 1
    assert record["spike_sigmas"] == pytest.approx(verdict.sigmas["grad_norm"])
    assert state.report["spikes_total"] == 1  # the step record's count
    after = monitor.state_dict()
    assert after["loss"] == before["loss"] and after["grad_norm"] == before["grad_norm"]
    assert after["total"] == 1


def test_nothing_is_judged_before_the_window_has_history():
    monitor = _monitor(SpikeConfig())
    state = _state()
    for _ in range(MIN_HISTORY - 1):
        _step(monitor, state, 1.0, 1.0)
    assert not monitor.judge(1e9, 1e9)
    _step(monitor, state, 1.0, 1.0)
    assert monitor.judge(1e9, 1e9)  # a constant window: anything above it is a spike


def test_non_finite_values_are_not_spikes_and_stay_out_of_the_window():
    monitor = _monitor(SpikeConfig())
    state = _state()
    for _ in range(20):
        _step(monitor, state, 1.0, 1.0)
    assert not _step(monitor, state, math.nan, math.inf)  # the NaN path handles those
    assert len(monitor.state_dict()["loss"]) == 20


def test_state_round_trip_resumes_the_same_judgement():
    rng = random.Random(1)
    cfg = SpikeConfig(spike_threshold=2.0, spike_window=16)
    first, state = _monitor(cfg), _state()
    for _ in range(30):
        _step(first, state, rng.uniform(1, 2), rng.uniform(0.1, 0.2))
    resumed = _monitor(cfg)
    resumed.load_state_dict(first.state_dict())
    probes = [(rng.uniform(1, 3), rng.uniform(0.1, 0.4)) for _ in range(20)]
    assert [bool(first.judge(*p)) for p in probes] == [bool(resumed.judge(*p)) for p in probes]
    assert resumed.total == first.total


def test_threshold_zero_turns_detection_off():
    monitor = _monitor(SpikeConfig(spike_threshold=0.0))
    state = _state()
    for _ in range(40):
        _step(monitor, state, 1.0, 1.0)
    assert not monitor.enabled and not _step(monitor, state, 1e9, 1e9)
    assert "spikes_total" not in state.report  # the step record has no spike count
