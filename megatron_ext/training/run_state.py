"""Where the run is: the loop's own counters, saved with every checkpoint beside the
components' state (``components``), so a resume continues exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_ext.checkpoint.layout import COMPONENTS_KEY as COMPONENTS

# Checkpoints written before components saved their own state kept it at the top level of the
# run state: {state_key: {field of its state: the old top-level field}} and
# {state_key: the old field holding its whole state}.
_LEGACY_FIELDS = {"counters": {"skipped_total": "skipped_total", "no_loss_total": "no_loss_total"}}
_LEGACY_DICTS = {"spikes": "spikes", "lisa": "lisa"}


@dataclass
class RunState:
    iteration: int = 0  # steps finished
    consumed_samples: int = 0
    wandb_run_id: Optional[str] = None

    def advance(self, global_batch_size: int) -> None:
        self.iteration += 1
        self.consumed_samples += global_batch_size

    def to_saved(self, component_states: dict) -> dict:
        return {**asdict(self), COMPONENTS: component_states}

    @classmethod
    def from_saved(cls, saved: dict) -> RunState:
        return cls(saved["iteration"], saved["consumed_samples"], saved.get("wandb_run_id"))


def saved_component_states(saved: dict) -> dict:
    """{state_key: state} from a checkpoint's run state, the older layout included."""
    states = saved.get(COMPONENTS)
    if states is not None:
        return states
    states = {
        key: {name: saved[old] for name, old in fields.items() if old in saved}
        for key, fields in _LEGACY_FIELDS.items()
    }
    states.update({key: saved[old] for key, old in _LEGACY_DICTS.items() if saved.get(old)})
    return states
