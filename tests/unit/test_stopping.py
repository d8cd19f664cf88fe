"""The stop policy on its own: skipped steps in a row (non-finite, or no loss token) up to
--nan-skip-limit, the counters it keeps, the exit interval and the agreed time limit."""

from types import SimpleNamespace

import pytest

from megatron_ext.config import StopConfig
from megatron_ext.training.stopping import StopPolicy


class Signals:
    def __init__(self, agreed=False, received=None):
        self._agreed, self.received = agreed, received

    def agreed(self, extra=False):
        return self._agreed or extra


def _cfg(nan_skip_limit=3, exit_interval=None, exit_duration_in_mins=None):
    return StopConfig(nan_skip_limit, exit_interval, exit_duration_in_mins)


GOOD = SimpleNamespace(non_finite=False, no_loss_tokens=False)
NAN = SimpleNamespace(non_finite=True, no_loss_tokens=False)
EMPTY = SimpleNamespace(non_finite=False, no_loss_tokens=True)


def _state():
    return SimpleNamespace(iteration=0, skipped_total=0, no_loss_total=0)


def test_skipped_steps_in_a_row_stop_the_run_and_a_good_step_resets_the_count():
    policy, state = StopPolicy(_cfg(nan_skip_limit=3), Signals()), _state()
    for it, result in enumerate([NAN, NAN, GOOD, NAN, EMPTY], start=1):
        policy.note_step(result, state)
        assert policy.check(it) is None
    policy.note_step(NAN, state)
    reason = policy.check(6)
    assert reason.non_finite and "3 iterations in a row were skipped" in reason.message
    assert "non-finite loss" in reason.message
    assert (state.skipped_total, state.no_loss_total) == (5, 1)


def test_batches_without_loss_tokens_count_toward_the_limit_and_are_named():
    policy, state = StopPolicy(_cfg(nan_skip_limit=2), Signals()), _state()
    policy.note_step(EMPTY, state)
    policy.note_step(EMPTY, state)
    reason = policy.check(2)
    assert reason.non_finite and "the last for: no token carried loss" in reason.message
    assert (state.skipped_total, state.no_loss_total) == (2, 2)


@pytest.mark.parametrize(
    "cfg,signals,iteration,expected",
    [
        (_cfg(exit_interval=4), Signals(), 8, "--exit-interval 4"),
        (_cfg(exit_interval=4), Signals(), 7, None),
        (_cfg(), Signals(agreed=True, received=15), 1, "signal 15"),
        (_cfg(exit_duration_in_mins=0.0), Signals(), 1, "time limit reached"),
    ],
)
def test_clean_stops(cfg, signals, iteration, expected):
    reason = StopPolicy(cfg, signals).check(iteration)
    assert (reason and reason.message) == expected
    assert reason is None or not reason.non_finite
