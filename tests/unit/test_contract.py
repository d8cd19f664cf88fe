"""The registry's side of the component contract, on plain stand-ins: how the three answers
combine, that every component hears each question, and that a failing hook neither hides a
phase's end from the components that saw it start nor skips another component's close."""

import pytest

from megatron_ext.training.contract import Component, Components, StepOutcome, StopReason


class Voter(Component):
    def __init__(self, name, log, *, accept=True, frozen=None, stop=None, fail_on=()):
        self.name, self.log = name, log
        self.accept, self.frozen, self.stop, self.fail_on = accept, frozen, stop, fail_on

    def _hear(self, what):
        self.log.append((self.name, what))
        if what in self.fail_on:
            raise RuntimeError(f"{self.name} fails in {what}")

    def may_apply_update(self, loss, grad_norm):
        self._hear("may_apply_update")
        return self.accept

    def frozen_parameters(self):
        return self.frozen

    def stop_requested(self):
        return self.stop

    def phase_started(self, phase, iteration):
        self._hear("start " + phase)

    def phase_ended(self, phase, iteration):
        self._hear("end " + phase)

    def close(self):
        self._hear("close")


def _components(*voters):
    components = Components()
    for v in voters:
        components.add(v)
    return components


def test_an_update_needs_every_yes_and_every_component_is_asked():
    log = []
    c = _components(Voter("a", log, accept=False), Voter("b", log))
    assert c.may_apply_update(2.0, 1.0) is False
    assert log == [("a", "may_apply_update"), ("b", "may_apply_update")]
    assert _components(Voter("a", []), Voter("b", [])).may_apply_update(2.0, 1.0) is True


def test_frozen_parameters_are_the_union_and_none_when_nobody_freezes():
    a, b, x = object(), object(), object()
    c = _components(Voter("a", [], frozen={a, x}), Voter("n", []), Voter("b", [], frozen={b}))
    assert c.frozen_parameters() == {a, b, x}
    assert _components(Voter("n", [])).frozen_parameters() is None


def test_the_first_stop_reason_wins():
    first, second = StopReason("signal SIGTERM"), StopReason("--exit-interval 4")
    c = _components(Voter("n", []), Voter("a", [], stop=first), Voter("b", [], stop=second))
    assert c.stop_requested() is first
    assert _components(Voter("n", [])).stop_requested() is None


def test_a_phase_ends_for_those_that_saw_it_start_even_when_a_start_fails():
    log = []
    c = _components(Voter("a", log), Voter("b", log, fail_on=("start setup",)), Voter("c", log))
    with pytest.raises(RuntimeError, match="b fails in start setup"):
        with c.phase("setup"):
            log.append(("body", "ran"))
    assert log == [("a", "start setup"), ("b", "start setup"), ("a", "end setup")]


def test_every_component_is_closed_last_registered_first_and_the_first_failure_raised():
    log = []
    c = _components(Voter("a", log), Voter("b", log, fail_on=("close",)), Voter("c", log))
    with pytest.raises(RuntimeError, match="b fails in close"):
        c.close()
    assert log == [("c", "close"), ("b", "close"), ("a", "close")]


def test_a_recorded_metric_keeps_its_latest_value():
    step = StepOutcome(3, result=None, lr=0.1, seconds=1.0, consumed_samples=12)
    step.record_metric("tokens_counted", 10)
    step.record_metric("tokens_counted", 12)
    assert step.metrics == {"tokens_counted": 12}


def test_find_gives_the_registered_component_of_a_class():
    class Other(Component):
        pass

    voter = Voter("a", [])
    c = _components(voter, Other())
    assert c.find(Voter) is voter
    with pytest.raises(LookupError, match="no Lisa is registered"):
        c.find(type("Lisa", (Component,), {}))
