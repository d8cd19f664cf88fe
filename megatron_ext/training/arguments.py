"""Command line and YAML config → :class:`RunConfig`.

Every config field is a flag of the same name (``micro_batch_size`` → ``--micro-batch-size``),
which keeps Megatron-LM's names where they exist. ``--model-size`` picks a preset whose fields
any explicit model flag overrides. ``--config run.yaml`` may set any flag (keys with dashes or
underscores); the command line overrides the file (``--no-FLAG`` turns a boolean off).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional

import yaml

from megatron_ext.config import ConfigError, ModelConfig, ParallelConfig
from megatron_ext.data.datasets import DATA_MODES, DataConfig
from megatron_ext.models.presets import PRESET_NAMES, model_preset
from megatron_ext.training.run_config import (
    DEVICES,
    CheckpointConfig,
    EvalConfig,
    FusionConfig,
    LoggingConfig,
    OptimConfig,
    ProfileConfig,
    RunConfig,
    TokenizerConfig,
)
from megatron_ext.variants import NORM_TYPE_NAMES

SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "fusion": FusionConfig,
    "profiling": ProfileConfig,
}
TOP_LEVEL = {"device": str, "transformer_impl": str, "num_workers": int}

HELP = {
    "norm_type": f"architecture: {', '.join(NORM_TYPE_NAMES)}",
    "post_num": "Mix-LN: number of leading Post-LN layers (default num_layers // 4)",
    "lns_mode": "LayerNorm-Scaling form: gamma (reference, learnable γ init) or fixed",
    "clip_gate_grad": "joint-norm clip of all GPAS gate gradients, after --clip-grad (0: off)",
    "freeze_gates": "keep the GPAS gates fixed (e.g. supervised fine-tuning)",
    "data_mode": f"{' or '.join(DATA_MODES)} (the GPAS reference protocol)",
    "data_path": "dataset prefixes, optionally weighted: 'P1 P2' or 'W1 P1 W2 P2'",
    "device": f"{' or '.join(DEVICES)}; cpu runs everything with gloo (CPU emulation)",
    "metrics_file": "JSONL metrics (default: <save or run dir>/metrics.jsonl)",
    "telemetry_interval": "every N steps log per-layer residual RMS, GPAS scales, grad norms",
    "eval_tokens": "per-document mode: evaluate on this many non-pad tokens (default 10M)",
    "new_wandb_on_resume": "start a new W&B run on resume instead of continuing the old one",
    "nan_skip_limit": "stop (after saving) when this many steps in a row have NaN/Inf",
    "fp8_format": "FP8 GEMMs through Transformer Engine: hybrid (E4M3 fwd, E5M2 bwd) or e4m3",
    "fp8_recipe": "delayed (scales from the amax history) or tensorwise (current scaling)",
    "fp8_amax_history_len": "delayed scaling: amax history length",
    "fp8_amax_compute_algo": "delayed scaling: max or most_recent of the history",
    "recompute_granularity": "full (whole layers) or selective (core attention only)",
    "overlap_grad_reduce": "reduce data-parallel gradients bucket by bucket during backward",
    "overlap_param_gather": "distributed optimizer: all-gather parameters bucket by bucket "
    "during the next forward",
    "ddp_bucket_size": "elements per gradient bucket with --overlap-grad-reduce "
    "(default: megatron-core's, max(40M, 1M × data-parallel size))",
    "bias_swiglu_fusion": "fused SwiGLU (torch.compile); default: on with --device cuda",
    "bias_dropout_fusion": "fused residual add (torch.compile); default: on with --device cuda",
    "rope_fusion": "Transformer Engine's fused RoPE; default: on with transformer_engine",
    "cross_entropy_loss_fusion": "fused cross-entropy (torch.compile; bf16 only); default: off",
    "profile": "profile iterations --profile-step-start+1 … --profile-step-end on "
    "--profile-ranks: with --use-pytorch-profiler a Chrome trace and a kernel summary, "
    "else cudaProfilerStart/Stop for nsys --capture-range=cudaProfilerApi",
    "use_pytorch_profiler": "--profile with torch.profiler (works on CPU too)",
    "profile_ranks": "global ranks to profile (default: 0)",
    "profile_dir": "where traces go (default: <save or run dir>/profile)",
    "tokenizer_type": "NullTokenizer (with --vocab-size), SentencePieceTokenizer, "
    "HuggingFaceTokenizer",
}


def _kind(annotation: str):
    """(python type, is list, is bool) of a dataclass field annotation string."""
    text = str(annotation)
    if "Sequence" in text or "list" in text:
        return (int if "int" in text else str), True, False
    if "bool" in text:
        return bool, False, True
    if "float" in text:
        return float, False, False
    if "int" in text:
        return int, False, False
    return str, False, False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a Llama-style model with GPAS or a normalization baseline on "
        "Megatron-Core.",
        allow_abbrev=False,
    )
    p.add_argument("--config", default=None, help="YAML file setting any of the flags below")
    p.add_argument(
        "--model-size",
        default=None,
        choices=PRESET_NAMES,
        help="shape preset; explicit model flags override it",
    )
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        for f in dataclasses.fields(cls):
            typ, is_list, is_bool = _kind(f.type)
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = dict(
                dest=f"{section}.{f.name}", default=None, help=HELP.get(f.name)
            )
            if is_bool:  # --flag / --no-flag, so a command line can undo a YAML recipe's true
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            elif is_list:
                group.add_argument(flag, nargs="+", type=typ, **kwargs)
            else:
                group.add_argument(flag, type=typ, **kwargs)
    group = p.add_argument_group("runtime")
    for name, typ in TOP_LEVEL.items():
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=HELP.get(name)
        )
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no file at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {path} is not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag: value")
    dests = {
        a.option_strings[0][2:].replace("-", "_"): a.dest
        for a in parser._actions
        if a.option_strings
    }
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in dests or name == "config":
            raise ConfigError(f"--config: {path}: unknown key {key!r} (keys are flag names)")
        out[dests[name]] = value
    return out


def parse_run_config(argv: Optional[list] = None) -> RunConfig:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = vars(parser.parse_args(argv))
    return run_config_from_values(args, model_size=args.get("model_size"))


def run_config_from_values(values: dict, model_size: Optional[str] = None) -> RunConfig:
    """Build a RunConfig from {"section.field": value} (None = not given)."""
    sections = {}
    for section, cls in SECTIONS.items():
        given = {f.name: values.get(f"{section}.{f.name}") for f in dataclasses.fields(cls)}
        given = {k: v for k, v in given.items() if v is not None}
        if section == "model":
            base = model_preset(model_size) if model_size else ModelConfig()
            sections[section] = dataclasses.replace(base, **given)
        else:
            sections[section] = cls(**given)
    top = {k: values[k] for k in TOP_LEVEL if values.get(k) is not None}
    return RunConfig(**sections, **top)
