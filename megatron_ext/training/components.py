"""The contract every training component keeps, and the registry the trainer calls it through.

A component owns one policy (when to save, evaluate, log, stop, which layers train) and sees
the run only through these hooks, called on every rank in the order the components were
registered:

- ``on_start(state)``: once, after the checkpoint (and the components' own state) is loaded,
  before the first step;
- ``before_step(iteration)`` / ``after_step(step)``: around each training step. ``iteration``
  is the step's 1-based number: the step about to run, then the step just finished (equal to
  ``RunState.iteration`` after it);
- ``phase_started(phase, iteration)`` / ``phase_ended(...)``: around the long stretches that
  are not steps (setup, checkpoint load, save and its background finalize, evaluation);
  ``iteration`` is the last finished step;
- ``at_end(state, stopped)``: once, after the loop; ``close()``: however the run ends.

State that must survive a checkpoint is the component's own: ``state_dict()`` for what is the
same on every rank (saved once, with the run state), ``sharded_state_dict()`` for what lives
with the parameters (megatron-core ``ShardedTensor``s, saved and resharded like them). The
checkpoint saves and restores both under the component's ``state_key`` without knowing what
they hold; a component with no ``state_key`` has no state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

logger = logging.getLogger("gpas")

# The phases a component may see start and end.
SETUP = "setup"
CHECKPOINT_LOAD = "checkpoint load"
CHECKPOINT_SAVE = "checkpoint save"
CHECKPOINT_FINALIZE = "checkpoint finalize"
EVALUATION = "evaluation"
PHASES = (SETUP, CHECKPOINT_LOAD, CHECKPOINT_SAVE, CHECKPOINT_FINALIZE, EVALUATION)

SHARDED_PREFIX = "components."  # the checkpoint keys of the components' sharded state


@dataclass
class StepOutcome:
    """One finished training step, as every component's ``after_step`` sees it."""

    iteration: int  # the step's 1-based number
    result: Any  # the step's IterationResult (loss, grad norm, whether the update happened)
    lr: float  # the learning rate the step used
    seconds: float  # the step's wall time
    consumed_samples: int  # samples consumed by the run after this step
    # Values earlier components add to the step's metrics record (counters, spike totals);
    # the step logger, registered after them, writes them.
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """What the components of one run share: built once by the trainer, handed to each
    component's constructor beside its own configuration section."""

    model: list  # the model chunks (wrapped)
    optimizer: Any
    metrics: Any  # the MetricsWriter
    phases: Components  # ``with ctx.phases.phase(EVALUATION): ...``
    speaks: bool  # this rank prints the run's lines (the logging rank)
    rank: int
    device: str
    run_dir: str  # where the metrics file, profiles and stack dumps go
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    global_batch_size: int
    train_iters: int


class Component:
    """Base class: every hook does nothing, and there is no state."""

    state_key: Optional[str] = None  # where its state is saved; None: it has none

    def on_start(self, state) -> None:
        pass

    def before_step(self, iteration: int) -> None:
        pass

    def after_step(self, step: StepOutcome) -> None:
        pass

    def phase_started(self, phase: str, iteration: int) -> None:
        pass

    def phase_ended(self, phase: str, iteration: int) -> None:
        pass

    def at_end(self, state, stopped: bool) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        """Replicated state (plain Python values, the same on every rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sharded_state_dict(self) -> dict:
        """State that lives with the parameters: a (nested) dict of megatron-core
        ``ShardedTensor``s whose keys are unique to this component."""
        return {}

    def load_sharded_state_dict(self, state: dict) -> None:
        """``state`` is :meth:`sharded_state_dict`'s structure with the loaded tensors."""


class Components:
    """The registered components, called in registration order."""

    def __init__(self) -> None:
        self._items: list[Component] = []
        self.iteration = 0  # the last finished step, for phases

    def add(self, component: Component) -> Component:
        key = component.state_key
        if key is not None and key in self.state_keys():
            raise ValueError(f"two components save their state under {key!r}")
        self._items.append(component)
        return component

    def __iter__(self) -> Iterator[Component]:
        return iter(self._items)

    def state_keys(self) -> list[str]:
        return [c.state_key for c in self._items if c.state_key is not None]

    # -- hooks ---------------------------------------------------------------------------------
    def on_start(self, state) -> None:
        self.iteration = state.iteration
        for c in self._items:
            c.on_start(state)

    def before_step(self, iteration: int) -> None:
        for c in self._items:
            c.before_step(iteration)

    def after_step(self, step: StepOutcome) -> None:
        self.iteration = step.iteration
        for c in self._items:
            c.after_step(step)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks a stretch of work that is not a step; its end is announced even if it fails."""
        for c in self._items:
            c.phase_started(name, self.iteration)
        try:
            yield
        finally:
            for c in self._items:
                c.phase_ended(name, self.iteration)

    def at_end(self, state, stopped: bool) -> None:
        for c in self._items:
            c.at_end(state, stopped)

    def close(self) -> None:
        """Every component is closed even if one fails; the first failure is raised after."""
        first = None
        for c in reversed(self._items):
            try:
                c.close()
            except Exception as err:  # noqa: BLE001 - closed regardless, raised below
                first = first or err
        if first is not None:
            raise first

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{state_key: replicated state} of every stateful component."""
        return {c.state_key: c.state_dict() for c in self._items if c.state_key is not None}

    def load_state_dict(self, saved: dict) -> None:
        for c in self._items:
            if c.state_key is not None and c.state_key in saved:
                c.load_state_dict(saved[c.state_key])

    def sharded_state_dict(self) -> dict:
        """{state_key: sharded state} of every component that has some, each tensor's key in
        the checkpoint prefixed with ``components.<state_key>.`` (a component may hand back the
        model's own sharded metadata with its data in place of the parameter's)."""
        out = {}
        for c in self._items:
            if c.state_key is not None:
                sharded = c.sharded_state_dict()
                if sharded:
                    out[c.state_key] = _namespaced(sharded, f"{SHARDED_PREFIX}{c.state_key}.")
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        for c in self._items:
            if c.state_key is not None and c.state_key in loaded:
                c.load_sharded_state_dict(loaded[c.state_key])


def _namespaced(tree, prefix: str):
    if isinstance(tree, dict):
        return {k: _namespaced(v, prefix) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_namespaced(v, prefix) for v in tree)
    if dataclasses.is_dataclass(tree) and hasattr(tree, "key"):
        return dataclasses.replace(tree, key=prefix + tree.key)
    return tree
