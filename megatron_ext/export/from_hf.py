"""Import a Hugging Face Llama (or one of our GPAS exports) as a checkpoint of ours.

The result is a weights-only ``torch_dist`` checkpoint: ``pretrain_gpas.py --load DIR`` starts
from it under any TP/PP layout, and ``tools/convert_to_hf.py`` exports it again. A Llama becomes
the ``pre`` norm type; a GPASForCausalLM export keeps its own type. Padded vocabulary rows
(megatron pads to a multiple of ``--make-vocab-size-divisible-by``) are zero.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from megatron_ext.checkpoint import save_load
from megatron_ext.config import ARCHITECTURE_FIELDS, ModelConfig, flag
from megatron_ext.export import weight_map as wm
from megatron_ext.export.megatron_model import build_cpu_model, checkpoint_param_names
from megatron_ext.layers.specs import model_layer_recipes
from megatron_ext.variants import GPASPlacement

SUPPORTED = ("llama", "gpas_llama")


class UnsupportedModelError(ValueError):
    """The Hugging Face model cannot be expressed by our models; the message says why."""


def model_config_from_hf(
    config, seq_length: Optional[int] = None, divisible_by: int = 128
) -> ModelConfig:
    if config.model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported; expected one of {SUPPORTED}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases in attention or MLP")
    if config.hidden_act != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} ≠ hidden_size / num_attention_heads")
    if problems:
        raise UnsupportedModelError("cannot import a model with " + ", ".join(problems))
    extra = {}
    if config.model_type == "gpas_llama":
        extra = dict(norm_type=config.norm_type, post_num=config.post_num, lns_mode=config.lns_mode)
    max_pos = config.max_position_embeddings
    return ModelConfig(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        ffn_hidden_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        seq_length=min(seq_length or max_pos, max_pos),
        max_position_embeddings=max_pos,
        rotary_base=int(rope.get("rope_theta", 10000)),
        layernorm_epsilon=config.rms_norm_eps,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        **{"norm_type": "pre", **extra},
    ).validate()


class _SafetensorsSource:
    """Tensor-by-name access to a Hugging Face model directory (one or many shards)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory} has no model.safetensors(.index.json)")
        self._handles = {}
        for name in files:
            handle = safe_open(os.path.join(directory, name), framework="pt")
            for key in handle.keys():
                self._handles[key] = handle

    def get(self, name: str) -> torch.Tensor:
        if name not in self._handles:
            raise KeyError(f"the Hugging Face model has no tensor {name!r}")
        return self._handles[name].get_tensor(name)


def _megatron_tensors(source: _SafetensorsSource, model: ModelConfig):
    """(checkpoint name, tensor) of every parameter, HF layouts converted."""
    padded = model.padded_vocab_size()

    def pad_rows(t):
        return (
            torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])])
            if padded > t.shape[0]
            else t
        )

    yield wm.EMBEDDING[1], pad_rows(source.get(wm.EMBEDDING[0]))
    for i, recipe in enumerate(model_layer_recipes(model)):
        hf, mg = wm.hf_layer_prefix(i), f"decoder.layers.{i}."
        q, k, v = (source.get(f"{hf}self_attn.{p}_proj.weight") for p in "qkv")
        yield mg + wm.QKV, wm.merge_qkv(q, k, v, model.num_attention_heads, model.query_groups)
        yield (
            mg + wm.FC1,
            wm.merge_fc1(
                source.get(hf + "mlp.gate_proj.weight"), source.get(hf + "mlp.up_proj.weight")
            ),
        )
        for hf_name, mg_name in {
            **wm.layer_linear_names(),
            **wm.layer_norm_names(recipe.style),
        }.items():
            yield mg + mg_name, source.get(hf + hf_name)
        if recipe.gpas is not GPASPlacement.NONE:
            yield mg + wm.GATE, source.get(hf + wm.HF_GATE).reshape(1)
    yield wm.FINAL_NORM[1], source.get(wm.FINAL_NORM[0])
    if model.untie_embeddings_and_output_weights:
        yield wm.LM_HEAD[1], pad_rows(source.get(wm.LM_HEAD[0]))


@dataclass
class ImportResult:
    checkpoint: str
    model: ModelConfig

    def training_flags(self) -> list[str]:
        """The pretrain_gpas.py model flags that rebuild this model."""
        m = asdict(self.model)
        flags = []
        for name in (*ARCHITECTURE_FIELDS, "max_position_embeddings"):
            value = m[name]
            if isinstance(value, bool):
                flags.append(flag(name) if value else "--no-" + flag(name)[2:])
            elif value is not None:
                flags += [flag(name), str(value)]
        return flags


def import_from_hf(
    hf_dir: str,
    save_root: str,
    *,
    seq_length: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Optional[dict] = None,
) -> ImportResult:
    from transformers import AutoConfig

    with open(os.path.join(hf_dir, "config.json")) as f:
        remote = "auto_map" in json.load(f)
    hf_config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=remote)
    model_cfg = model_config_from_hf(hf_config, seq_length)
    model = build_cpu_model(model_cfg, dtype)
    params = checkpoint_param_names(model)
    seen = set()
    with torch.no_grad():
        for name, tensor in _megatron_tensors(_SafetensorsSource(hf_dir), model_cfg):
            if name not in params:
                raise KeyError(f"internal: no parameter {name} in the model")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: the Hugging Face tensor has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"the import left parameters unset: {', '.join(missing)}")
    run_state = {
        "iteration": 0,
        "consumed_samples": 0,
        "config": {"model": asdict(model_cfg), "tokenizer": tokenizer or {}},
        "imported_from": os.path.abspath(hf_dir),
    }
    path = save_load.save_checkpoint(save_root, 0, [model], None, None, run_state)
    return ImportResult(checkpoint=path, model=model_cfg)
