"""How much each layer of a finished model does (the paper's §5, "the curse of depth").

Per layer l of a model, on fixed validation windows:
  * importance: validation loss with layer l skipped (its output replaced by its input) minus
    the full model's loss — near zero means the layer contributes little;
  * angular distance between the layer's input and output hidden states,
    arccos(cos(h_l, h_{l+1}))/π averaged over tokens — small means the layer barely turns the
    residual stream;
  * the residual stream's RMS after the layer (h_0 is the embedding output).
Runs on the Hugging Face form of the model (an export, or a checkpoint exported on the fly
to our modeling code). A stock-Llama export of a GPAS model has the GPAS scales folded into its
weights and norms (spec §9), so skipping one of its layers is not the same intervention as in
the unfolded model: give the checkpoint, or a ``--target gpas`` export, for the paper's numbers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ext import fileio


class DepthAnalysisError(ValueError):
    """Bad input to the analysis; the message names the path or flag."""


@dataclass
class DepthReport:
    label: str
    source: str
    norm_type: str
    num_tokens: int
    loss: float
    skip_loss: list[float] = field(default_factory=list)  # per layer
    angular_distance: list[float] = field(default_factory=list)  # per layer
    rms: list[float] = field(default_factory=list)  # h_0 … h_L
    gpas_scales: list[Optional[float]] = field(default_factory=list)

    @property
    def importance(self) -> list[float]:
        return [s - self.loss for s in self.skip_loss]

    def to_json(self) -> dict:
        return {**asdict(self), "importance": self.importance}


# -- loading ---------------------------------------------------------------------------------
def _is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_hf_model(path: str):
    """(model in float32, eval mode; norm type) from an export or a training checkpoint."""
    if not os.path.isdir(path):
        raise DepthAnalysisError(f"--model: no directory at {path}")
    if _is_export(path):
        return _load_export(path)
    from megatron_ext.export.to_hf import ExportOptions, export_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "export")
        try:
            export_to_hf(
                ExportOptions(checkpoint=path, output=out, target="gpas", dtype="float32"),
                progress=lambda _msg: None,
            )
        except (FileNotFoundError, ValueError) as err:
            raise DepthAnalysisError(
                f"--model: {path} is neither a Hugging Face export (no config.json) nor a "
                f"readable checkpoint ({err})"
            ) from err
        return _load_export(out)


def _load_export(path: str):
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if "auto_map" in config:  # our modeling code: load it from the package, not the export
        from megatron_ext.hf.modeling_gpas import GPASForCausalLM

        model = GPASForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    norm_type = config.get("norm_type") or config["model_type"]
    return model.eval(), norm_type


# -- data ------------------------------------------------------------------------------------
def validation_windows(prefix: str, num_sequences: int, seq_length: int) -> torch.Tensor:
    """The first ``num_sequences`` windows of ``seq_length`` tokens of an indexed dataset
    (documents in order, concatenated as training sees them)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not os.path.isfile(prefix + ".idx"):
        raise DepthAnalysisError(f"--data-path: no indexed dataset at {prefix}.idx/.bin")
    dataset = IndexedDataset(prefix)
    need = num_sequences * seq_length
    parts, have = [], 0
    for i in range(len(dataset)):
        doc = torch.from_numpy(dataset[i].astype("int64"))
        parts.append(doc)
        have += len(doc)
        if have >= need:
            break
    if have < need:
        raise DepthAnalysisError(
            f"--data-path: {prefix} holds {have} tokens, fewer than --num-sequences "
            f"{num_sequences} × {seq_length}; ask for fewer"
        )
    return torch.cat(parts)[:need].view(num_sequences, seq_length)


# -- measurement -----------------------------------------------------------------------------
def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_output(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _output_hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _loss(model, tokens: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        logits = model(batch).logits.double()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def analyze(
    model, tokens: torch.Tensor, *, label: str, source: str, norm_type: str, batch_size: int = 8
) -> DepthReport:
    layers = list(model.model.layers)
    inputs: dict[int, list] = {i: [] for i in range(len(layers))}
    outputs: dict[int, list] = {i: [] for i in range(len(layers))}
    skip: dict = {"layer": None}

    def make_hook(i):
        def hook(_module, args, kwargs, output):
            hidden_in = _hidden_of(args, kwargs)
            if skip["layer"] == i:
                return _replace_output(output, hidden_in)
            if skip["layer"] is None:
                inputs[i].append(hidden_in.detach().float())
                outputs[i].append(_output_hidden(output).detach().float())
            return None

        return hook

    handles = [
        layer.register_forward_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        full = _loss(model, tokens, batch_size)
        angular, rms = [], [_rms(torch.cat(inputs[0]))]
        for i in range(len(layers)):
            h_in, h_out = torch.cat(inputs[i]), torch.cat(outputs[i])
            angular.append(_angular_distance(h_in, h_out))
            rms.append(_rms(h_out))
        inputs.clear()
        outputs.clear()
        skipped = []
        for i in range(len(layers)):
            skip["layer"] = i
            skipped.append(_loss(model, tokens, batch_size))
    finally:
        for h in handles:
            h.remove()
    scales = model.gpas_scales() if hasattr(model, "gpas_scales") else [None] * len(layers)
    return DepthReport(
        label=label,
        source=source,
        norm_type=norm_type,
        num_tokens=tokens.numel(),
        loss=full,
        skip_loss=skipped,
        angular_distance=angular,
        rms=rms,
        gpas_scales=scales,
    )


def _angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1)
    return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean().item()


def _rms(h: torch.Tensor) -> float:
    return h.double().pow(2).mean().sqrt().item()


# -- reporting -------------------------------------------------------------------------------
def markdown(reports: list[DepthReport]) -> str:
    out = []
    for r in reports:
        out.append(
            f"### {r.label} (`{r.norm_type}`, {r.source})\n\n"
            f"Validation loss {r.loss:.4f} on {r.num_tokens:,} tokens.\n\n"
            "| layer | loss with the layer skipped | importance (Δ loss) | angular distance "
            "in→out | RMS after | GPAS scale |\n|---|---|---|---|---|---|"
        )
        for i, (s, imp, ang) in enumerate(
            zip(r.skip_loss, r.importance, r.angular_distance, strict=True)
        ):
            scale = r.gpas_scales[i]
            out.append(
                f"| {i + 1} | {s:.4f} | {imp:+.4f} | {ang:.4f} | {r.rms[i + 1]:.3f} | "
                + ("—" if scale is None else f"{scale:.4f}")
                + " |"
            )
        out.append("")
    if len(reports) > 1:
        out.append(_comparison(reports))
    return "\n".join(out)


def _comparison(reports: list[DepthReport]) -> str:
    names = [r.label for r in reports]
    lines = [
        "### Importance side by side (validation loss rise when the layer is skipped)\n",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    depth = max(len(r.skip_loss) for r in reports)
    for i in range(depth):
        cells = [f"{r.importance[i]:+.4f}" if i < len(r.importance) else "" for r in reports]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append(
        "| mean |"
        + " | ".join(f"{sum(r.importance) / len(r.importance):+.4f}" for r in reports)
        + " |"
    )
    return "\n".join(lines) + "\n"


def plot(reports: list[DepthReport], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (imp, ang, rms) = plt.subplots(1, 3, figsize=(17, 4.5))
    for r in reports:
        layers = list(range(1, len(r.skip_loss) + 1))
        imp.plot(layers, r.importance, "o-", label=r.label)
        ang.plot(layers, r.angular_distance, "o-", label=r.label)
        rms.plot(range(len(r.rms)), r.rms, "o-", label=r.label)
    imp.axhline(0.0, color="grey", lw=0.8)
    imp.set(title="Layer importance", xlabel="layer skipped", ylabel="Δ validation loss")
    ang.set(title="Angular distance, layer input → output", xlabel="layer", ylabel="arccos(cos)/π")
    rms.set(title="Residual-stream RMS", xlabel="depth (0: embeddings)", ylabel="RMS")
    rms.set_yscale("log")
    for ax in (imp, ang, rms):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
