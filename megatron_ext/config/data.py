"""Where a run's data is and how samples are cut (Megatron-LM's flag names and blend syntax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_ext.config.fields import ConfigError, check_choices, option, require

DATA_MODES = ("packed", "per-document", "sft")
DataMode = Literal[DATA_MODES]


@dataclass
class DataConfig:
    """Where the data is and how samples are cut (Megatron-LM's flag names)."""

    data_path: Optional[Sequence[str]] = option(
        None, "dataset prefixes, optionally weighted: 'P1 P2' or 'W1 P1 W2 P2'"
    )
    train_data_path: Optional[Sequence[str]] = option(
        None, "training prefixes (with weights: W1 P1 W2 P2 …), instead of --data-path and --split"
    )
    valid_data_path: Optional[Sequence[str]] = option(
        None, "validation prefixes, instead of --data-path and --split"
    )
    test_data_path: Optional[Sequence[str]] = option(
        None, "test prefixes, instead of --data-path and --split"
    )
    split: str = option("969,30,1", "train,valid,test shares of the documents of --data-path")
    data_cache_path: Optional[str] = option(
        None, "where the packed sample indices are cached (default: beside the data)"
    )
    mock_data: bool = option(False, "random tokens instead of a dataset (smoke tests)")
    data_mode: DataMode = option(
        "packed",
        "packed, per-document (the GPAS reference protocol) or sft (one fine-tuning example "
        "per sample, with its loss mask; --sft selects it)",
        unknown="data mode",
    )
    pad_id: int = option(
        0, "per-document mode: input id placed on padding (masked out of the loss)"
    )

    def validate(self) -> DataConfig:
        check_choices(self)
        per_split = any((self.train_data_path, self.valid_data_path, self.test_data_path))
        require(
            self.mock_data or self.data_path or per_split,
            "--data-path",
            "give a dataset prefix (or --train-data-path …, or --mock-data for synthetic data)",
        )
        require(
            not (self.data_path and per_split),
            "--data-path",
            "use either --data-path with --split, or "
            "--train-data-path/--valid-data-path/--test-data-path, not both",
        )
        for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
            parse_blend(getattr(self, name), flag_name=name)
        return self


def parse_blend(items: Optional[Sequence[str]], flag_name: str = "data_path"):
    """Megatron-LM's blend syntax: ``p1 p2`` (equal weights) or ``w1 p1 w2 p2``."""
    if not items:
        return None
    items = list(items)
    flag = "--" + flag_name.replace("_", "-")

    def is_number(x):
        try:
            float(x)
            return True
        except ValueError:
            return False

    if not any(is_number(x) for x in items):
        return items, None
    if len(items) % 2 or not all(is_number(x) for x in items[0::2]):
        raise ConfigError(f"{flag}: expected 'weight prefix' pairs, got {' '.join(items)}")
    weights = [float(x) for x in items[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{flag}: weights must be non-negative with a positive sum")
    return items[1::2], weights
