"""Export a checkpoint of any TP/PP/DP layout to Hugging Face, streaming one layer at a time.

Two targets: ``llama`` (a stock ``LlamaForCausalLM`` through the exact fold of spec §9; Pre-LN-
shaped types only) and ``gpas`` (``GPASForCausalLM``, our modeling code, every type; shipped in
the export and loaded with ``trust_remote_code=True``). ``auto`` picks ``llama`` when the model
folds, else ``gpas``. Everything is written to ``OUTPUT.tmp`` and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_ext.config import ModelConfig
from megatron_ext.export import weight_map as wm
from megatron_ext.export.dcp_reader import DistCheckpointReader
from megatron_ext.export.llama_fold import LlamaFold, is_llama_foldable, plan_llama_fold
from megatron_ext.export.safetensors_writer import ShardedSafetensorsWriter, parse_size
from megatron_ext.export.tokenizer_export import SpecialIds, export_tokenizer
from megatron_ext.layers.specs import model_layer_recipes
from megatron_ext.variants import GPASPlacement, LayerStyle, deepnorm_alpha

logger = logging.getLogger("gpas.export")

TARGETS = ("auto", "llama", "gpas")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_CODE_FILES = ("configuration_gpas.py", "modeling_gpas.py")


@dataclass
class ExportOptions:
    checkpoint: str
    output: str
    target: str = "auto"
    dtype: Optional[str] = None  # None: the checkpoint's parameter dtype
    max_shard_size: str = "5GB"
    tokenizer_type: Optional[str] = None  # None: the one the run trained with
    tokenizer_model: Optional[str] = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"--target: {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        if os.path.exists(self.output) and os.listdir(self.output) and not self.overwrite:
            raise FileExistsError(
                f"--output: {self.output} exists and is not empty; pass --overwrite to replace it"
            )


@dataclass
class ExportResult:
    output: str
    target: str
    norm_type: str
    dtype: torch.dtype
    num_bytes: int
    seconds: float
    files: list = field(default_factory=list)
    fold: Optional[LlamaFold] = None
    tokenizer: Optional[str] = None


def resolve_target(target: str, model: ModelConfig) -> str:
    if target == "auto":
        return "llama" if is_llama_foldable(model) else "gpas"
    return target


def _gate_tensors(reader: DistCheckpointReader, model: ModelConfig) -> list[Optional[torch.Tensor]]:
    recipes = model_layer_recipes(model)
    return [
        reader.layer_tensor(i, wm.GATE).float() if r.gpas is not GPASPlacement.NONE else None
        for i, r in enumerate(recipes)
    ]


class _LayerExporter:
    """Produces the HF tensors of one layer (folded for the Llama target)."""

    def __init__(self, reader, model: ModelConfig, fold: Optional[LlamaFold]):
        self.reader, self.model, self.fold = reader, model, fold

    def tensors(self, layer: int, style: LayerStyle, has_gate: bool):
        read = self.reader.layer_tensor
        m = self.model
        q, k, v = wm.split_qkv(
            read(layer, wm.QKV), m.num_attention_heads, m.query_groups, m.kv_channels
        )
        yield "self_attn.q_proj.weight", q
        yield "self_attn.k_proj.weight", k
        yield "self_attn.v_proj.weight", v
        gate, up = wm.split_fc1(read(layer, wm.FC1))
        yield "mlp.gate_proj.weight", gate
        yield "mlp.up_proj.weight", up
        for hf_name, mg_name in wm.layer_linear_names().items():
            w = read(layer, mg_name)
            if self.fold is not None:
                w = (self.fold.o_proj if "o_proj" in hf_name else self.fold.down_proj)(layer, w)
            yield hf_name, w
        for hf_name, mg_name in wm.layer_norm_names(style).items():
            gamma = read(layer, mg_name)
            if self.fold is not None:
                fn = self.fold.input_norm if hf_name.startswith("input") else self.fold.pre_mlp_norm
                gamma = fn(layer, gamma)
            yield hf_name, gamma
        if has_gate and self.fold is None:
            yield wm.HF_GATE, read(layer, wm.GATE).reshape(())


def _hf_config(model: ModelConfig, target: str, dtype: torch.dtype, ids: SpecialIds):
    from transformers import LlamaConfig

    common = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.kv_channels,
        max_position_embeddings=model.max_positions,
        rms_norm_eps=model.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )
    if target == "llama":
        config = LlamaConfig(**common)
        config.architectures = ["LlamaForCausalLM"]
    else:
        from megatron_ext.hf.configuration_gpas import GPASConfig

        config = GPASConfig(
            **common,
            norm_type=model.norm_type,
            post_num=model.resolved_post_num,
            lns_mode=model.lns_mode,
            deepnorm_alpha=deepnorm_alpha(model.num_layers),
        )
        config.architectures = ["GPASForCausalLM"]
        config.auto_map = {
            "AutoConfig": "configuration_gpas.GPASConfig",
            "AutoModelForCausalLM": "modeling_gpas.GPASForCausalLM",
        }
    config.dtype = dtype
    return config


def _write_tokenizer(opts: ExportOptions, reader: DistCheckpointReader, out: str):
    """Returns (special ids, a description) — or (empty ids, None) without a tokenizer."""
    tok = reader.tokenizer_config()
    kind = opts.tokenizer_type or tok.get("tokenizer_type")
    path = opts.tokenizer_model or tok.get("tokenizer_model")
    if kind in (None, "NullTokenizer") or not path:
        logger.warning("the run used no tokenizer (%s); the export has none", kind)
        return SpecialIds(), None
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"the tokenizer the run trained with, {path}, is not there; pass --tokenizer-model"
        )
    ids = export_tokenizer(kind, path, out)
    if ids.eos is None and tok.get("eod_id") is not None:
        ids.eos = tok["eod_id"]
    return ids, f"{kind} {path}"


def export_to_hf(
    opts: ExportOptions, progress: Optional[Callable[[str], None]] = None
) -> ExportResult:
    opts.validate()
    t0 = time.perf_counter()
    say = progress or logger.info
    reader = DistCheckpointReader(opts.checkpoint)
    model = reader.model_config()
    target = resolve_target(opts.target, model)
    dtype = DTYPES[opts.dtype] if opts.dtype else reader.params_dtype()
    recipes = model_layer_recipes(model)
    fold = plan_llama_fold(model, _gate_tensors(reader, model)) if target == "llama" else None
    if fold is not None:
        say(fold.epsilon_report())

    tmp = opts.output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writer = ShardedSafetensorsWriter(tmp, parse_size(opts.max_shard_size))

    def cast(t: torch.Tensor) -> torch.Tensor:
        out = t.to(dtype)
        if not torch.isfinite(out).all():
            raise OverflowError(
                f"a tensor is not finite in {dtype} after folding; export with --dtype float32 "
                "or --target gpas"
            )
        return out

    V = model.vocab_size
    writer.add(wm.EMBEDDING[0], cast(reader.read(wm.EMBEDDING[1])[:V]))
    layers = _LayerExporter(reader, model, fold)
    for i, recipe in enumerate(recipes):
        for name, tensor in layers.tensors(i, recipe.style, recipe.gpas is not GPASPlacement.NONE):
            writer.add(wm.hf_layer_prefix(i) + name, cast(tensor))
        say(f"layer {i + 1}/{len(recipes)} written")
    final = reader.read(wm.FINAL_NORM[1])
    writer.add(wm.FINAL_NORM[0], cast(fold.final_norm(final) if fold else final))
    if model.untie_embeddings_and_output_weights:
        writer.add(wm.LM_HEAD[0], cast(reader.read(wm.LM_HEAD[1])[:V]))
    files = writer.finish()

    ids, tokenizer = _write_tokenizer(opts, reader, tmp)
    config = _hf_config(model, target, dtype, ids)
    config.save_pretrained(tmp)
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad
    ).save_pretrained(tmp)
    if target == "gpas":
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
        for name in HF_CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
    _replace_dir(tmp, opts.output)
    return ExportResult(
        output=opts.output,
        target=target,
        norm_type=model.norm_type,
        dtype=dtype,
        num_bytes=writer.total_bytes,
        seconds=time.perf_counter() - t0,
        files=files,
        fold=fold,
        tokenizer=tokenizer,
    )


def _replace_dir(tmp: str, final: str) -> None:
    """Put the finished ``tmp`` at ``final``; an old ``final`` is removed only afterwards."""
    old = final.rstrip("/") + ".old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
