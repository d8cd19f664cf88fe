"""The checkpoint manager: when to save (``--save-interval``, the final save, a stop), what to
keep (``--keep-last-checkpoints``), what to resume from (``--load``, ``--finetune``), and the
run state saved beside the model and optimizer."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

from megatron_ext.training import checkpointing
from megatron_ext.training.model_setup import sync_params
from megatron_ext.training.run_config import CheckpointConfig

logger = logging.getLogger("gpas")


@dataclass
class RunState:
    """Where the run is; saved with every checkpoint, so a resume continues exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_total: int = 0  # iterations whose update was skipped (non-finite loss or grad norm)
    wandb_run_id: Optional[str] = None

    def advance(self, global_batch_size: int) -> None:
        self.iteration += 1
        self.consumed_samples += global_batch_size

    @classmethod
    def from_saved(cls, saved: dict) -> RunState:
        """From a checkpoint's run state (older checkpoints lack the later fields)."""
        return cls(
            iteration=saved["iteration"],
            consumed_samples=saved["consumed_samples"],
            skipped_total=saved.get("skipped_total", 0),
            wandb_run_id=saved.get("wandb_run_id"),
        )


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, model, optimizer, scheduler, run_config: dict):
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_config = run_config  # saved with each checkpoint (preflight compares it)
        self._saved_at: Optional[int] = None

    def load(self) -> RunState:
        """The state to start from: the checkpoint under ``--load`` (weights only with
        ``--finetune``, which starts at iteration 0), else a fresh one."""
        c = self.cfg
        if not c.load:
            return RunState()
        saved = checkpointing.load_checkpoint(
            c.load, self.model, self.optimizer, self.scheduler, load_optimizer=not c.finetune
        )
        if saved is None:
            logger.info("--load %s holds no checkpoint yet; starting from scratch", c.load)
            return RunState()
        if c.finetune:
            return RunState()
        state = RunState.from_saved(saved)
        self._saved_at = state.iteration  # that checkpoint is this iteration's save
        logger.info(
            "resumed from iteration %d (%d samples consumed)",
            state.iteration,
            state.consumed_samples,
        )
        return state

    def after_step(self, state: RunState) -> None:
        if self.cfg.save_interval and state.iteration % self.cfg.save_interval == 0:
            self.save(state)

    def at_end(self, state: RunState) -> None:
        """However the run ends (last iteration, a signal, a time limit, too many non-finite
        steps), its state is saved unless this iteration's checkpoint exists already."""
        if self._saved_at != state.iteration:
            self.save(state)

    def save(self, state: RunState) -> None:
        if not self.cfg.save:
            return
        t0 = time.perf_counter()
        sync_params(self.model)
        path = checkpointing.save_checkpoint(
            self.cfg.save,
            state.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            {**dataclasses.asdict(state), "config": self.run_config},
            self.cfg.keep_last_checkpoints,
        )
        self._saved_at = state.iteration
        logger.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - t0)
