"""The stop policy and the run counters on their own: skipped steps in a row (non-finite, or no
loss token) up to --nan-skip-limit, the counts of skipped updates, the exit interval and the
agreed time limit, and both components' state across a checkpoint."""

from types import SimpleNamespace

import pytest

from megatron_ext.config import StopConfig
from megatron_ext.training.components.counters import RunCounters
from megatron_ext.training.components.stop_policy import StopPolicy
from megatron_ext.training.contract import StepOutcome


class Signals:
    def __init__(self, received=None):
        self.received = received


def _cfg(nan_skip_limit=3, exit_interval=None, exit_duration_in_mins=None):
    return StopConfig(nan_skip_limit, exit_interval, exit_duration_in_mins)


def _result(non_finite=False, no_loss_tokens=False, rejected=False):
    applied = not (non_finite or no_loss_tokens or rejected)
    return SimpleNamespace(
        non_finite=non_finite, no_loss_tokens=no_loss_tokens, rejected=rejected, applied=applied
    )


GOOD, NAN = _result(), _result(non_finite=True)
EMPTY, SPIKE = _result(no_loss_tokens=True), _result(rejected=True)


def _run(components, results, first=1):
    """The results as steps first, first+1, … through every component's hook; the last
    step's recorded metrics."""
    step = None
    for it, result in enumerate(results, start=first):
        step = StepOutcome(it, result, lr=0.0, seconds=0.0, consumed_samples=it)
        for c in components:
            c.after_step(step)
    return step.metrics


def test_skipped_steps_in_a_row_stop_the_run_and_a_good_step_resets_the_count():
    policy, counters = StopPolicy(_cfg(nan_skip_limit=3), Signals()), RunCounters()
    report = _run([counters, policy], [NAN, NAN, GOOD, NAN, EMPTY])
    assert policy.reason is None
    assert report == {"skipped_iterations": 4, "no_loss_iterations": 1}
    _run([counters, policy], [NAN], first=6)
    reason = policy.reason
    assert reason.non_finite and "3 iterations in a row were skipped" in reason.message
    assert "non-finite loss" in reason.message
    assert (counters.skipped_total, counters.no_loss_total) == (5, 1)


def test_batches_without_loss_tokens_count_toward_the_limit_and_are_named():
    policy, counters = StopPolicy(_cfg(nan_skip_limit=2), Signals()), RunCounters()
    _run([counters, policy], [EMPTY, EMPTY])
    reason = policy.reason
    assert reason.non_finite and "the last for: no token carried loss" in reason.message
    assert (counters.skipped_total, counters.no_loss_total) == (2, 2)


def test_a_refused_spike_counts_as_skipped_but_not_toward_the_limit():
    policy, counters = StopPolicy(_cfg(nan_skip_limit=2), Signals()), RunCounters()
    report = _run([counters, policy], [NAN, SPIKE, NAN, SPIKE])
    assert policy.reason is None and policy.skipped_in_a_row == 0
    assert report == {"skipped_iterations": 4}  # no batch without a loss token: not recorded


def test_state_round_trip_stops_where_the_uninterrupted_run_stops():
    """Two skipped steps before a checkpoint and one after it stop a run with a limit of 3,
    as they would without the checkpoint."""
    policy, counters = StopPolicy(_cfg(nan_skip_limit=3), Signals()), RunCounters()
    _run([counters, policy], [GOOD, NAN, EMPTY])
    resumed, resumed_counters = StopPolicy(_cfg(nan_skip_limit=3), Signals()), RunCounters()
    resumed.load_state_dict(policy.state_dict())
    resumed_counters.load_state_dict(counters.state_dict())
    report = _run([resumed_counters, resumed], [NAN], first=4)
    assert resumed.reason is not None and "3 iterations in a row" in resumed.reason.message
    assert report == {"skipped_iterations": 3, "no_loss_iterations": 1}


@pytest.mark.parametrize(
    "cfg,signals,iteration,expected",
    [
        (_cfg(exit_interval=4), Signals(), 8, "--exit-interval 4"),
        (_cfg(exit_interval=4), Signals(), 7, None),
        (_cfg(), Signals(received=15), 1, "signal 15"),
        (_cfg(exit_duration_in_mins=0.0), Signals(), 1, "time limit reached"),
    ],
)
def test_clean_stops(cfg, signals, iteration, expected):
    reason = StopPolicy(cfg, signals).check(iteration)
    assert (reason and reason.message) == expected
    assert reason is None or not reason.non_finite
