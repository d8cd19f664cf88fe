"""Find, read and freeze the GPAS gates of a model (for logging, clipping and fine-tuning)."""

from __future__ import annotations

import torch

from megatron_ext.gpas import gpas_scale
from megatron_ext.layers.transformer_layer import GATE_PARAM_NAME, is_gpas_gate


def gate_layers(module: torch.nn.Module) -> list[tuple[int, torch.nn.Parameter]]:
    """(global 0-based layer index, gate) for every gated layer held by this rank."""
    out = []
    for sub in module.modules():
        gate = sub._parameters.get(GATE_PARAM_NAME) if hasattr(sub, "_parameters") else None
        if gate is not None and is_gpas_gate(gate):
            out.append((sub.layer_number - 1, gate))
    return sorted(out, key=lambda item: item[0])


def gate_values(module: torch.nn.Module) -> dict[int, dict[str, float]]:
    """{layer: {"gate": g, "scale": c = 1 − SiLU(g)}} for this rank's layers."""
    return {
        layer: {"gate": gate.detach().float().item(), "scale": gpas_scale(gate.detach()).item()}
        for layer, gate in gate_layers(module)
    }


def freeze_gates(module: torch.nn.Module) -> int:
    """Stop training the gates (e.g. for supervised fine-tuning). Call before wrapping in DDP.

    Returns how many gates were frozen.
    """
    gates = gate_layers(module)
    for _, gate in gates:
        gate.requires_grad_(False)
    return len(gates)


def gate_scale_summary(modules) -> dict:
    """Mean, min, max and per-layer list of the GPAS scales c_l over the whole model, from this
    rank's (unwrapped) model chunks (collective: each rank holds only its pipeline stage's
    layers). Empty for types without gates."""
    values = {}
    for module in modules:
        values.update(gate_values(module))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, values)
        for v in gathered:
            values.update(v)
    if not values:
        return {}
    scales = [values[k]["scale"] for k in sorted(values)]
    return {
        "gate_scale_mean": sum(scales) / len(scales),
        "gate_scale_min": min(scales),
        "gate_scale_max": max(scales),
        "gpas_scales": scales,
    }
