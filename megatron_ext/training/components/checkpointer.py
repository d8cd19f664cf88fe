"""The checkpointer: *when* the run is saved (``--save-interval``, the final save, a stop) and
what it resumes from (``--load``, ``--finetune``, ``--pretrained-checkpoint``), with the run
state and every component's state beside the model and optimizer, the space a save needs, and
background writes (``--async-save``). *How* a checkpoint is written and read is
``megatron_ext/checkpoint/``'s."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Optional

from megatron_ext.checkpoint import manifest as checkpoint_manifest
from megatron_ext.checkpoint import save_load
from megatron_ext.checkpoint.layout import CheckpointError, checkpoint_dir
from megatron_ext.checkpoint.manifest import human_bytes
from megatron_ext.checkpoint.save_load import LoadedCheckpoint, PendingSave
from megatron_ext.checkpoint.space import check_free_space, estimate_checkpoint_bytes
from megatron_ext.config import CheckpointConfig
from megatron_ext.platform.collectives import one_line
from megatron_ext.training.contract import (
    CHECKPOINT_FINALIZE,
    CHECKPOINT_LOAD,
    CHECKPOINT_SAVE,
    Component,
    Components,
)
from megatron_ext.training.model_setup import sync_params
from megatron_ext.training.run_state import RunState, saved_component_states

logger = logging.getLogger("gpas")


class Checkpointer(Component):
    """Saves the model, optimizer, scheduler, run state and every registered component's state
    (``components``), and restores them. Register it last: a save sees every other component's
    state after the step."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        model,
        optimizer,
        scheduler,
        run_config: dict,
        components: Components,
        *,
        bf16: bool = False,
    ):
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_config = run_config  # saved with each checkpoint (preflight compares it)
        self.components = components  # whose state is saved, and who sees the phases
        self.state: Optional[RunState] = None
        self._resumed: Optional[LoadedCheckpoint] = None
        self._saved_at: Optional[int] = None
        self._size: Optional[int] = None  # bytes of the last checkpoint written or loaded
        self._bf16 = bf16
        self._pending: Optional[PendingSave] = None
        self._queue = None
        if cfg.async_save and cfg.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    # -- resuming ------------------------------------------------------------------------------
    def load(self) -> RunState:
        """The state to start from: the newest intact checkpoint under ``--load`` (weights only
        with ``--finetune``, which starts at iteration 0), else a fresh one. The components'
        state follows in :meth:`restore_components`, once they are registered."""
        with self.components.phase(CHECKPOINT_LOAD):
            state = self._load_run()
            self._check_space()  # before anything is written under --save
            self.components.after_load(state.iteration)
            return state

    def _load_run(self) -> RunState:
        c = self.cfg
        loaded = self._load(c.load, weights_only=c.finetune) if c.load else None
        if loaded is None and c.pretrained_checkpoint:
            logger.info(
                "--load %s holds no checkpoint yet; starting from the weights of "
                "--pretrained-checkpoint %s",
                c.load, c.pretrained_checkpoint,
            )  # fmt: skip
            self._load(c.pretrained_checkpoint, weights_only=True)
            return RunState()
        if loaded is None:
            if c.load:
                logger.info("--load %s holds no checkpoint yet; starting from scratch", c.load)
            return RunState()
        if c.finetune:
            return RunState()
        self._resumed = loaded
        state = RunState.from_saved(loaded.run_state)
        self._saved_at = state.iteration  # that checkpoint is this iteration's save
        if c.load == c.save:
            self._size = _manifest_bytes(c.save, state.iteration)
        logger.info(
            "resumed from iteration %d (%d samples consumed)",
            state.iteration,
            state.consumed_samples,
        )
        return state

    def _load(self, root: str, *, weights_only: bool) -> Optional[LoadedCheckpoint]:
        return save_load.load_checkpoint(
            root,
            self.model,
            self.optimizer,
            self.scheduler,
            load_optimizer=not weights_only,
            on_damaged=self.cfg.on_damaged_checkpoint,
            verify_hashes=self.cfg.verify_integrity,
        )

    def restore_components(self) -> None:
        """Collective: every registered component's state from the checkpoint resumed from
        (nothing after a fresh start or ``--finetune``: components start fresh)."""
        if self._resumed is None:
            return
        with self.components.phase(CHECKPOINT_LOAD):
            self.components.load_state_dict(saved_component_states(self._resumed.run_state))
            loaded, missing = save_load.load_components_sharded(
                self._resumed.directory, self.components.sharded_state_dict()
            )
            self.components.load_sharded_state_dict(loaded)
        for key in missing:
            logger.warning(
                "%s holds no saved state for %s; it starts fresh", self._resumed.directory, key
            )

    # -- hooks ---------------------------------------------------------------------------------
    def on_start(self, state: RunState) -> None:
        self.state = state

    def after_step(self, step) -> None:
        self._finalize(blocking=False)
        if self.cfg.save_interval and step.iteration % self.cfg.save_interval == 0:
            self.save(self.state)

    def at_end(self, state: RunState, stopped: bool) -> None:
        """However the run ends (last iteration, a signal, a time limit, too many non-finite
        steps), its state is saved unless this iteration's checkpoint exists already, and no
        background write is left unfinished."""
        if self._saved_at != state.iteration:
            self.save(state)
        self._finalize(blocking=True)

    # -- saving --------------------------------------------------------------------------------
    def _check_space(self) -> None:
        """Before training: refuse a ``--save`` filesystem that cannot hold the next checkpoint."""
        if self.cfg.save:
            check_free_space(self.cfg.save, self._expected_bytes(), "a checkpoint")

    def save(self, state: RunState) -> None:
        if not self.cfg.save:
            return
        self._finalize(blocking=True)  # one save at a time: the previous one becomes the latest
        with self.components.phase(CHECKPOINT_SAVE):
            self._save(state)

    def _save(self, state: RunState) -> None:
        what = f"checkpoint {state.iteration}"
        check_free_space(self.cfg.save, self._expected_bytes(), what)
        t0 = time.perf_counter()
        sync_params(self.model)
        run_state = {**state.to_saved(self.components.state_dict()), "config": self.run_config}
        pending = save_load.start_save(
            self.cfg.save,
            state.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            run_state,
            components_sharded=self.components.sharded_state_dict(),
            keep_last=self.cfg.keep_last_checkpoints,
            hashed=self.cfg.verify_integrity,
            async_save=self._queue is not None,
        )
        self._saved_at = state.iteration
        if pending.request is None:
            self._finished(pending, t0)
            return
        pending.request.add_finalize_fn(partial(self._finished, pending, t0))
        self._queue.schedule_async_request(pending.request)
        self._pending = pending
        logger.info(
            "checkpoint %s: written in the background (training held %.2f s)",
            pending.final,
            time.perf_counter() - t0,
        )

    def close(self) -> None:
        """At exit, however it happens: finish a background write."""
        if self._queue is not None and self._pending is not None:
            self._finalize(blocking=True)

    # -- internals -----------------------------------------------------------------------------
    def _finished(self, pending: PendingSave, t0: float) -> None:
        t_finish = time.perf_counter()
        self._size = pending.finish()
        done = time.perf_counter()
        background = ""
        if pending.request is not None:  # the manifest and rename held training, not the write
            background = f"; finalizing held training {done - t_finish:.2f} s"
        logger.info(
            "saved checkpoint %s in %.1f s (%s%s)",
            pending.final,
            done - t0,
            human_bytes(self._size),
            background,
        )

    def _finalize(self, blocking: bool) -> None:
        """Collective: make a finished background write the latest checkpoint."""
        if self._queue is None or self._pending is None:
            return
        pending = self._pending
        try:
            with self.components.phase(CHECKPOINT_FINALIZE):
                self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            self._pending = None
            raise
        except Exception as err:  # the writer failed on some rank (a full disk, say)
            self._pending = None
            raise pending.failure(one_line(err)) from err
        if self._queue.get_num_unfinalized_calls() == 0:
            self._pending = None

    def _expected_bytes(self) -> int:
        if self._size is None:
            self._size = estimate_checkpoint_bytes(self.model, self._bf16)
        return self._size


def _manifest_bytes(root: str, iteration: int) -> Optional[int]:
    manifest = checkpoint_manifest.read(checkpoint_dir(root, iteration))
    return None if manifest is None else manifest.total_bytes
