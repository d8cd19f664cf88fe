"""The contract every training component keeps, and the registry the trainer calls it through.

A component owns one policy (when to save, evaluate, log, stop, which layers train) and sees
the run only through these hooks, called on every rank in the order the components were
registered:

- ``after_load(iteration)``: once, when the checkpoint to start from is loaded (``iteration``:
  the step it ends at, 0 for a fresh start), before anything is written under ``--save``; only
  components registered before the setup hear it (as they alone see the setup phase);
- ``on_start(state)``: once, after the checkpoint (and the components' own state) is loaded,
  before the first step;
- ``before_step(iteration)`` / ``after_step(step)``: around each training step. ``iteration``
  is the step's 1-based number: the step about to run, then the step just finished (equal to
  ``RunState.iteration`` after it);
- ``phase_started(phase, iteration)`` / ``phase_ended(...)``: around the long stretches that
  are not steps (setup, checkpoint load, save and its background finalize, evaluation);
  ``iteration`` is the last finished step;
- ``at_end(state, stopped)``: once, after the loop; ``on_error(error)``: when the run ends
  with an exception (in ``run()`` or ``with Trainer(...)``), before ``close()``, which is
  called however the run ends.

Three questions let a component steer the loop without the loop knowing it (the registry
combines the answers; no component is named by the trainer or the step):

- ``may_apply_update(loss, grad_norm)``: may this step's update be applied? Asked on every rank
  between the gradient norm and the update, with values every rank shares; any "no" skips it.
- ``frozen_parameters()``: the parameters the next step leaves untouched (the union is taken).
- ``stop_requested()``: a :class:`StopReason` to end the run after this step (the first wins).

A component adds values of its own to the step's metrics record with
``step.record_metric(name, value)`` in ``after_step``; the step logger, registered after the
components that record, writes the latest value of each into the next record (the metrics file,
TensorBoard and W&B alike).

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
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from megatron_ext.checkpoint.layout import COMPONENTS_KEY
from megatron_ext.training.run_state import RunState

if TYPE_CHECKING:
    from megatron_ext.training.step import IterationResult

logger = logging.getLogger("gpas")

C = TypeVar("C", bound="Component")

# The phases a component may see start and end.
SETUP = "setup"
CHECKPOINT_LOAD = "checkpoint load"
CHECKPOINT_SAVE = "checkpoint save"
CHECKPOINT_FINALIZE = "checkpoint finalize"
EVALUATION = "evaluation"
PHASES = (SETUP, CHECKPOINT_LOAD, CHECKPOINT_SAVE, CHECKPOINT_FINALIZE, EVALUATION)

SHARDED_PREFIX = f"{COMPONENTS_KEY}."  # the checkpoint keys of the components' sharded state


@dataclass(frozen=True)
class StopReason:
    """Why the run ends before ``--train-iters``."""

    message: str
    non_finite: bool = False  # the run failed: a TrainingStopped error, not a clean exit


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was saved."""


@dataclass
class StepOutcome:
    """One finished training step, as every component's ``after_step`` sees it."""

    iteration: int  # the step's 1-based number
    result: IterationResult  # loss, grad norm, whether the update happened
    lr: float  # the learning rate the step used
    seconds: float  # the step's wall time
    consumed_samples: int  # samples consumed by the run after this step
    metrics: dict[str, Any] = field(default_factory=dict)  # what components recorded

    def record_metric(self, name: str, value: Any) -> None:
        """Add ``name`` to the step's metrics record (its latest value reaches the next record
        the step logger writes)."""
        self.metrics[name] = value


@dataclass(frozen=True)
class RunContext:
    """What the components of one run share: built once by the trainer, handed to each
    component's constructor beside its own configuration section."""

    model: list  # the model chunks (wrapped)
    optimizer: Any
    metrics: Any  # the MetricsWriter
    phases: Components  # ``with ctx.phases.phase(EVALUATION): ...``
    is_logging_rank: bool  # this rank prints the run's lines and writes its metrics
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

    def after_load(self, iteration: int) -> None:
        pass

    def on_start(self, state: RunState) -> None:
        pass

    def before_step(self, iteration: int) -> None:
        pass

    def after_step(self, step: StepOutcome) -> None:
        pass

    def phase_started(self, phase: str, iteration: int) -> None:
        pass

    def phase_ended(self, phase: str, iteration: int) -> None:
        pass

    def at_end(self, state: RunState, stopped: bool) -> None:
        pass

    def on_error(self, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass

    # -- questions the loop asks -----------------------------------------------------------------
    def may_apply_update(self, loss: Optional[float], grad_norm: float) -> bool:
        return True

    def frozen_parameters(self) -> Optional[set]:
        return None

    def stop_requested(self) -> Optional[StopReason]:
        return None

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

    def find(self, kind: type[C]) -> C:
        """The registered component of class ``kind`` (the first, if several)."""
        found = next((c for c in self._items if isinstance(c, kind)), None)
        if found is None:
            raise LookupError(f"no {kind.__name__} is registered")
        return found

    def state_keys(self) -> list[str]:
        return [c.state_key for c in self._items if c.state_key is not None]

    # -- hooks ---------------------------------------------------------------------------------
    def after_load(self, iteration: int) -> None:
        self.iteration = iteration  # the phases from now on say so
        for c in self._items:
            c.after_load(iteration)

    def on_start(self, state: RunState) -> None:
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
        """Marks a stretch of work that is not a step. Every component that saw it start sees
        it end, even if the work (or another component's hook) fails."""
        started: list[Component] = []
        try:
            for c in self._items:
                c.phase_started(name, self.iteration)
                started.append(c)
            yield
        finally:
            _call_all(started, lambda c: c.phase_ended(name, self.iteration))

    def at_end(self, state: RunState, stopped: bool) -> None:
        for c in self._items:
            c.at_end(state, stopped)

    def on_error(self, error: BaseException) -> None:
        _call_all(self._items, lambda c: c.on_error(error))

    def close(self) -> None:
        """Every component is closed, the last registered first, even if one fails."""
        _call_all(list(reversed(self._items)), lambda c: c.close())

    # -- the answers ---------------------------------------------------------------------------
    def may_apply_update(self, loss: Optional[float], grad_norm: float) -> bool:
        """Every component is asked (none is skipped by an earlier "no")."""
        answers = [c.may_apply_update(loss, grad_norm) for c in self._items]
        return all(answers)

    def frozen_parameters(self) -> Optional[set]:
        frozen = [f for c in self._items if (f := c.frozen_parameters())]
        return set().union(*frozen) if frozen else None

    def stop_requested(self) -> Optional[StopReason]:
        return next((r for c in self._items if (r := c.stop_requested()) is not None), None)

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


def _call_all(items: list, call) -> None:
    """``call`` on each item even if one fails; the first failure is raised after."""
    first = None
    for item in items:
        try:
            call(item)
        except Exception as err:  # noqa: BLE001 - every item called, the first raised below
            first = first or err
    if first is not None:
        raise first


def _namespaced(tree, prefix: str):
    if isinstance(tree, dict):
        return {k: _namespaced(v, prefix) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_namespaced(v, prefix) for v in tree)
    if dataclasses.is_dataclass(tree) and hasattr(tree, "key"):
        return dataclasses.replace(tree, key=prefix + tree.key)
    return tree
