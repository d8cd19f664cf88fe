"""LISA (Layerwise Importance Sampled AdamW, arXiv 2403.17919): every ``--lisa-interval`` steps,
``--lisa-layers`` decoder layers are sampled uniformly without replacement and only they (with
the embeddings, the final norm and the output layer, which always train) are updated.

For its interval an inactive layer's parameters stop requiring gradients, as the reference's
layer-activation callback does: backward still runs through the layer (the layers below and the
embeddings need its input gradient) but computes no weight gradients for it (megatron-core's
linear layers take their frozen-weight path, which skips the weight-gradient GEMM and its
communication inside tensor parallelism), and nothing is accumulated into its main gradients.
Under ``--overlap-grad-reduce`` the inactive parameters are marked ready for the data-parallel
reduction at the start of each step, so buckets still launch (buckets hold several layers).
Their main gradients are then dropped before the optimizer step (set to None), so the update
skips them entirely: no step, no weight decay, and their Adam moments and step count stay as
they were, to be used again when the layer is sampled again. The gradient norm, and so
clipping, covers the trained parameters only. Adam state exists for every layer (the optimizer
is built once; see docs/sft.md for what that costs).

The choice is a function of the run's seed and the interval index alone, so every rank (every
TP, PP and DP rank) makes it alike without communication, and a run resumed mid-interval
continues with the same layers. A pipeline stage may hold none of the sampled layers.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import numpy as np
import torch

from megatron_ext.config import SFTConfig
from megatron_ext.models.gpt import unwrap_model
from megatron_ext.training.contract import CHECKPOINT_SAVE, Component, StepOutcome
from megatron_ext.training.optimizer import common_adam_step, init_adam_state, set_adam_steps

logger = logging.getLogger("gpas")


def sample_layers(seed: int, interval_index: int, num_layers: int, k: int) -> list[int]:
    """The 0-based decoder layers trained during interval ``interval_index``."""
    rng = np.random.default_rng([seed, interval_index, 0x4C495341])  # "LISA"
    return sorted(int(i) for i in rng.choice(num_layers, size=k, replace=False))


def decoder_layer_params(chunks) -> dict[int, list[torch.nn.Parameter]]:
    """{global 0-based layer index: its parameters} for the layers this rank holds."""
    out: dict[int, list] = {}
    for chunk in chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            out.setdefault(layer.layer_number - 1, []).extend(layer.parameters())
    return out


class Lisa(Component):
    """Which decoder layers train this step: ``frozen`` holds the parameters the next step
    leaves untouched (None: train everything). Its state is each layer's count of updates sat
    out, from which every layer's own Adam step is restored after a resume. While a checkpoint
    is saved, every parameter carries the step of those that always train (megatron-core saves
    one Adam step for all)."""

    state_key = "lisa"

    def __init__(self, cfg: SFTConfig, ctx, *, num_layers: int, seed: int):
        self.cfg = cfg
        self.optimizer = ctx.optimizer
        self.num_layers = num_layers
        self.seed = seed
        self.metrics = ctx.metrics
        # Only what trains at all is ever switched (frozen GPAS gates stay frozen).
        self.layers = {
            i: [p for p in params if p.requires_grad]
            for i, params in decoder_layer_params(ctx.model).items()
        }
        self._interval: Optional[int] = None
        self.active: list[int] = list(range(num_layers))
        self.frozen: Optional[set] = None  # this interval's inactive parameters
        # per layer: optimizer updates it sat out (its Adam step is behind by that many)
        self.missed = [0] * num_layers
        self._saving: Optional[contextlib.ExitStack] = None

    @property
    def enabled(self) -> bool:
        return 0 < self.cfg.lisa_layers < self.num_layers

    def on_start(self, state) -> None:
        """Every layer gets its Adam state before the first step (a checkpoint needs one for
        layers not sampled yet), and after a resume each layer's own Adam step back (the
        checkpoint holds one step for all)."""
        if not self.enabled:
            return
        init_adam_state(self.optimizer)
        if any(self.missed):
            behind = {p: self.missed[i] for i, params in self.layers.items() for p in params}
            set_adam_steps(self.optimizer, behind)

    def before_step(self, iteration: int) -> None:
        if not self.enabled:
            return
        interval = (iteration - 1) // self.cfg.lisa_interval
        if interval == self._interval:
            return
        self._interval = interval
        self.active = sample_layers(self.seed, interval, self.num_layers, self.cfg.lisa_layers)
        self.frozen = {
            p for layer, params in self.layers.items() if layer not in self.active
            for p in params
        }  # fmt: skip
        for params in self.layers.values():
            for p in params:
                p.requires_grad_(p not in self.frozen)
        self._report(iteration)

    def frozen_parameters(self) -> Optional[set]:
        return self.frozen

    def phase_started(self, phase: str, iteration: int) -> None:
        if phase == CHECKPOINT_SAVE and self.enabled:
            self._saving = contextlib.ExitStack()
            self._saving.enter_context(common_adam_step(self.optimizer))

    def phase_ended(self, phase: str, iteration: int) -> None:
        if phase == CHECKPOINT_SAVE and self._saving is not None:
            self._saving, saving = None, self._saving
            saving.close()  # every parameter's own step back

    def after_step(self, step: StepOutcome) -> None:
        """Count the update the inactive layers sat out."""
        if self.enabled and step.result.applied:
            chosen = set(self.active)
            for i in range(self.num_layers):
                self.missed[i] += i not in chosen

    def state_dict(self) -> dict:
        return {"missed_updates": list(self.missed)} if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        missed = state.get("missed_updates")
        if missed is not None:
            self.missed = list(missed)

    def _report(self, iteration: int) -> None:
        logger.info(
            "LISA: layers %s train for iterations %d-%d",
            ", ".join(str(i + 1) for i in self.active),
            iteration,
            iteration + self.cfg.lisa_interval - 1,
        )
        if self.metrics is not None:
            chosen = set(self.active)
            self.metrics.write(
                {
                    "iteration": iteration,
                    "lisa_active": [int(i in chosen) for i in range(self.num_layers)],
                }
            )
