"""Model size presets: the reference configs (spec §4) and tiny ones for tests."""

from __future__ import annotations

from dataclasses import replace

from megatron_ext.config import ConfigError, ModelConfig

# name: (hidden, ffn, layers, heads). Vocab 32000, sequence 256 for all reference sizes.
_REFERENCE_SHAPES = {
    "71m": (512, 1368, 12, 8),
    "130m": (768, 2048, 12, 12),
    "250m": (768, 2560, 24, 16),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
}

# Tiny models for tests and the CPU quickstart (small vocab, short sequence).
_TINY_SHAPES = {
    "tiny": (64, 176, 2, 4),
    "tiny4": (64, 176, 4, 4),
    "small": (128, 352, 4, 4),
}

_REFERENCE_DEFAULTS = dict(vocab_size=32000, seq_length=256)
_TINY_DEFAULTS = dict(vocab_size=512, seq_length=32, make_vocab_size_divisible_by=64)

PRESET_NAMES = tuple(_REFERENCE_SHAPES) + tuple(_TINY_SHAPES)


def model_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig with the shapes of preset ``name``; ``overrides`` set any other field."""
    key = name.lower()
    if key in _REFERENCE_SHAPES:
        shape, defaults = _REFERENCE_SHAPES[key], _REFERENCE_DEFAULTS
    elif key in _TINY_SHAPES:
        shape, defaults = _TINY_SHAPES[key], _TINY_DEFAULTS
    else:
        raise ConfigError(
            f"--model-size: unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}"
        )
    hidden, ffn, layers, heads = shape
    base = ModelConfig(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_layers=layers,
        num_attention_heads=heads,
        **defaults,
    )
    return replace(base, **overrides)
