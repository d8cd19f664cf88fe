"""A run's whole configuration, in one place and importable without torch or megatron-core.

* ``fields.py`` — the conventions: :func:`option` (type, default and help declared once),
  ``Literal`` choices checked by :func:`check_choices`, :func:`require` raising
  :class:`ConfigError` that names the flag to change.
* ``model.py`` — :class:`ModelConfig` (the architecture) and :class:`ParallelConfig`.
* ``data.py`` — :class:`DataConfig` (dataset prefixes, blends, splits, the data mode).
* ``run.py`` — :class:`RunConfig`: the sections above plus tokenizer, optimizer, evaluation,
  checkpointing, fusion, logging and profiling; ``RunConfig.validate`` checks the whole run.

The command line is derived from these fields (``planning/arguments.py``: ``micro_batch_size``
→ ``--micro-batch-size``); a run's configuration is built once and not mutated afterwards.
"""

from megatron_ext.config.data import DATA_MODES, DataConfig, parse_blend
from megatron_ext.config.fields import ConfigError, check_choices, choices_of, flag, option, require
from megatron_ext.config.model import ARCHITECTURE_FIELDS, ModelConfig, ParallelConfig
from megatron_ext.config.run import (
    CheckpointConfig,
    EvalConfig,
    FaultConfig,
    FusionConfig,
    LoggingConfig,
    OptimConfig,
    ProfileConfig,
    RunConfig,
    SFTConfig,
    SpikeConfig,
    StopConfig,
    TokenizerConfig,
)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "DATA_MODES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FusionConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ProfileConfig",
    "RunConfig",
    "SFTConfig",
    "SpikeConfig",
    "FaultConfig",
    "StopConfig",
    "TokenizerConfig",
    "check_choices",
    "choices_of",
    "flag",
    "option",
    "parse_blend",
    "require",
]
