"""LISA (Layerwise Importance Sampled AdamW, arXiv 2403.17919): every ``--lisa-interval`` steps,
``--lisa-layers`` decoder layers are sampled uniformly without replacement and only they (with
the embeddings, the final norm and the output layer, which always train) are updated.

An inactive layer's gradients are dropped before the optimizer step (its main gradients set to
None), so the update skips it entirely: no step, no weight decay, and its Adam moments and step
count stay as they were, to be used again when the layer is sampled again (as when the
reference freezes the layer). The gradient norm, and so clipping, covers the trained
parameters only. Backward still runs through every layer (the active ones need it below them).

The choice is a function of the run's seed and the interval index alone, so every rank (every
TP, PP and DP rank) makes it alike without communication, and a run resumed mid-interval
continues with the same layers. A pipeline stage may hold none of the sampled layers.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from megatron_ext.config import SFTConfig
from megatron_ext.training.model_setup import unwrap_model
from megatron_ext.training.optimizer import init_adam_state, set_adam_steps

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


class LayerActivation:
    """Which decoder layers train this step; asked once per iteration by the trainer."""

    def __init__(
        self, cfg: SFTConfig, chunks, num_layers: int, seed: int, metrics=None, saved=None
    ):
        self.cfg = cfg
        self.num_layers = num_layers
        self.seed = seed
        self.metrics = metrics
        self.layers = decoder_layer_params(chunks)
        self._interval: Optional[int] = None
        self.active: list[int] = list(range(num_layers))
        self._frozen: set = set()  # this interval's inactive parameters
        # per layer: optimizer updates it sat out (its Adam step is behind by that many)
        self.missed = list((saved or {}).get("missed_updates", [0] * num_layers))

    def prepare(self, optimizer) -> None:
        """Every layer gets its Adam state before the first step (a checkpoint needs one for
        layers not sampled yet), and after a resume each layer's own Adam step back (the
        checkpoint holds one step for all)."""
        if not self.enabled:
            return
        init_adam_state(optimizer)
        if any(self.missed):
            behind = {p: self.missed[i] for i, params in self.layers.items() for p in params}
            set_adam_steps(optimizer, behind)

    def after_step(self, state, result) -> None:
        """Count the update the inactive layers sat out; the run state carries the counts."""
        if self.enabled and result.applied:
            chosen = set(self.active)
            for i in range(self.num_layers):
                self.missed[i] += i not in chosen
            state.lisa = {"missed_updates": list(self.missed)}

    @property
    def enabled(self) -> bool:
        return 0 < self.cfg.lisa_layers < self.num_layers

    def before_step(self, iteration: int) -> Optional[set]:
        """The model parameters to leave untouched by the step that makes ``iteration + 1``
        (None: train everything)."""
        if not self.enabled:
            return None
        interval = iteration // self.cfg.lisa_interval
        if interval != self._interval:
            self._interval = interval
            self.active = sample_layers(self.seed, interval, self.num_layers, self.cfg.lisa_layers)
            self._frozen = {
                p for layer, params in self.layers.items() if layer not in self.active
                for p in params
            }  # fmt: skip
            self._report(iteration + 1)
        return self._frozen

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
