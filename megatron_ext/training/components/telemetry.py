"""Training-dynamics telemetry (the paper's analysis as a feature): per layer, the residual
stream's RMS after each sublayer, the GPAS scale c_l, and the layer's gradient norm."""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_ext.layers.transformer_layer import GPASTransformerLayer
from megatron_ext.metrics_file import TelemetryRecord
from megatron_ext.models.gates import gate_values
from megatron_ext.models.gpt import unwrap_model
from megatron_ext.training.contract import Component, RunContext, StepOutcome
from megatron_ext.training.model_setup import sync_params


class ResidualRecorder:
    """Keeps the RMS of the residual stream after each sublayer (first micro-batch only)."""

    def __init__(self):
        self.rms: dict[tuple[int, str], float] = {}

    def record(self, layer: int, sublayer: str, hidden: torch.Tensor) -> None:
        key = (layer, sublayer)
        if key not in self.rms:
            self.rms[key] = hidden.detach().float().pow(2).mean().sqrt().item()


def _layers(chunks):
    for chunk in chunks:
        for module in unwrap_model(chunk).modules():
            if isinstance(module, GPASTransformerLayer):
                yield module


def attach(chunks, recorder) -> None:
    for layer in _layers(chunks):
        layer.telemetry = recorder


def detach(chunks) -> None:
    attach(chunks, None)


def layer_grad_norms(chunks) -> dict[int, float]:
    """L2 norm of each layer's gradient on this rank (DDP main_grad, else .grad)."""
    out = {}
    for layer in _layers(chunks):
        total = 0.0
        for p in layer.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None:
                total += g.detach().float().pow(2).sum().item()
        out[layer.layer_number - 1] = math.sqrt(total)
    return out


def collect(chunks, recorder: ResidualRecorder) -> list[dict]:
    """Per-layer rows from every rank (collective), sorted by layer."""
    grads = layer_grad_norms(chunks)
    gates = {}
    for chunk in chunks:
        gates.update(gate_values(unwrap_model(chunk)))
    local = []
    for layer in sorted(grads):
        row = {
            "layer": layer,
            "grad_norm": grads[layer],
            "rms_after_attn": recorder.rms.get((layer, "attn")),
            "rms_after_mlp": recorder.rms.get((layer, "mlp")),
        }
        if layer in gates:
            row["gpas_scale"] = gates[layer]["scale"]
            row["gpas_gate"] = gates[layer]["gate"]
        local.append(row)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        merged = {}
        for rows in gathered:
            for row in rows:  # TP/DP replicas hold the same layer: keep one
                merged.setdefault(row["layer"], row)
        return [merged[k] for k in sorted(merged)]
    return local


class TelemetryHook(Component):
    """Every ``--telemetry-interval`` iterations: records the residual stream during that
    iteration's step and writes one telemetry record after it (0: never)."""

    def __init__(self, interval: int, ctx: RunContext):
        self.interval, self.ctx = interval, ctx
        self._recorder: Optional[ResidualRecorder] = None

    def before_step(self, iteration: int) -> None:
        if self.interval > 0 and iteration % self.interval == 0:
            self._recorder = ResidualRecorder()
            attach(self.ctx.model, self._recorder)

    def after_step(self, step: StepOutcome) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        detach(self.ctx.model)
        sync_params(self.ctx.model)
        rows = collect(self.ctx.model, recorder)
        self.ctx.metrics.write(TelemetryRecord(step.iteration, rows).as_dict())
