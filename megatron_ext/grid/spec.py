"""What a grid is: sizes × norm types × seeds, the flags every cell shares, and each cell's own
directory and recipe. Saved as ``<out>/grid.json`` so a re-run (or a Slurm task) needs only the
directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext import fileio
from megatron_ext.config import ConfigError
from megatron_ext.metrics_file import METRICS_FILE
from megatron_ext.models.presets import PRESET_NAMES
from megatron_ext.variants import NORM_TYPE_NAMES, NORM_TYPES

GRID_FILE = "grid.json"
CELLS_DIR = "cells"
#: flags a cell sets itself; giving them among the shared flags would be ambiguous
CELL_FLAGS = (
    "--norm-type",
    "--seed",
    "--model-size",
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--ffn-hidden-size",
    "--save",
    "--load",
    "--metrics-file",
    "--config",
)

_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


def size_flags(size: str) -> dict:
    """Recipe keys for a size: a preset name, or ``LxH`` / ``LxHxA`` (layers × hidden × heads;
    heads default to hidden/32, the FFN to 8/3·hidden rounded up to a multiple of 32, as Llama)."""
    if size.lower() in PRESET_NAMES:
        return {"model-size": size.lower()}
    match = _SHAPE.match(size)
    if not match:
        raise ConfigError(
            f"--sizes: {size!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a shape "
            "LAYERSxHIDDEN[xHEADS] such as 12x128"
        )
    layers, hidden = int(match.group(1)), int(match.group(2))
    heads = int(match.group(3)) if match.group(3) else max(1, hidden // 32)
    if hidden % heads:
        raise ConfigError(f"--sizes: {size}: hidden {hidden} is not divisible by {heads} heads")
    ffn = 32 * math.ceil(8 * hidden / 3 / 32)
    return {
        "num-layers": layers,
        "hidden-size": hidden,
        "num-attention-heads": heads,
        "ffn-hidden-size": ffn,
    }


def resolve_norm_types(names: Sequence[str]) -> list[str]:
    if list(names) == ["all"]:
        return list(NORM_TYPE_NAMES)
    unknown = [n for n in names if n not in NORM_TYPES]
    if unknown:
        raise ConfigError(
            f"--norm-types: unknown {', '.join(unknown)}; choose from all, "
            + ", ".join(NORM_TYPE_NAMES)
        )
    if len(set(names)) != len(names):
        raise ConfigError("--norm-types: a norm type is listed twice")
    return list(names)


@dataclass(frozen=True)
class Cell:
    index: int
    size: str
    norm_type: str
    seed: int
    directory: str

    @property
    def name(self) -> str:
        return f"{self.size}/{self.norm_type}/seed{self.seed}"

    @property
    def recipe_path(self) -> str:
        return os.path.join(self.directory, "recipe.yaml")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.directory, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.directory, METRICS_FILE)

    @property
    def logs(self) -> str:
        return os.path.join(self.directory, "logs")

    def recipe(self) -> dict:
        return {**size_flags(self.size), "norm-type": self.norm_type, "seed": self.seed}

    def argv(self, shared: Sequence[str]) -> list[str]:
        """pretrain_gpas.py's flags for this cell (the layout examples/slurm/train.sbatch uses)."""
        return [
            "--config",
            self.recipe_path,
            "--save",
            self.checkpoints,
            "--load",
            self.checkpoints,
            "--metrics-file",
            self.metrics_path,
            *shared,
        ]


@dataclass
class GridSpec:
    out: str
    sizes: list[str]
    norm_types: list[str]
    seeds: list[int]
    train_args: list[str] = field(default_factory=list)  # flags every cell shares
    train_iters: Optional[int] = None  # resolved from the flags by validate()

    def cells(self) -> list[Cell]:
        """Cells in run order: size, then seed, then norm type (a half-finished grid has whole
        comparisons at the smaller sizes first)."""
        out, index = [], 0
        for size in self.sizes:
            for seed in self.seeds:
                for norm in self.norm_types:
                    directory = os.path.join(self.out, CELLS_DIR, size, norm, f"seed{seed}")
                    out.append(Cell(index, size, norm, seed, directory))
                    index += 1
        return out

    def validate(self) -> None:
        """Every check that can fail before a cell runs: names, duplicates, shared flags, and
        pretrain_gpas.py's own parsing and validation of the first cell's full flags."""
        if not self.sizes:
            raise ConfigError("--sizes: give at least one size")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        if len(set(self.sizes)) != len(self.sizes) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--sizes/--seeds: a value is listed twice")
        for size in self.sizes:
            size_flags(size)
        self.norm_types = resolve_norm_types(self.norm_types)
        for arg in self.train_args:
            flag = arg.split("=", 1)[0]
            if flag in CELL_FLAGS:
                raise ConfigError(
                    f"{flag} is set by the grid for each cell; drop it from the shared flags "
                    "(use --sizes, --norm-types, --seeds)"
                )
        self.train_iters = _train_iters(self, self.cells()[0])

    def save(self) -> None:
        fileio.write_json(os.path.join(self.out, GRID_FILE), dataclasses.asdict(self))

    @classmethod
    def load(cls, out: str) -> GridSpec:
        path = os.path.join(out, GRID_FILE)
        if not os.path.isfile(path):
            raise ConfigError(
                f"{out}: no {GRID_FILE}; start the grid with --sizes, --norm-types and --seeds"
            )
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        values["out"] = out
        return cls(**values)

    def same_grid(self, other: GridSpec) -> bool:
        fields = ("sizes", "norm_types", "seeds", "train_args")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def write_recipe(cell: Cell) -> None:
    import yaml

    header = f"# grid cell {cell.index}: {cell.name}\n"
    fileio.write_text(cell.recipe_path, header + yaml.safe_dump(cell.recipe(), sort_keys=False))


def _train_iters(spec: GridSpec, cell: Cell) -> int:
    """Parse a cell's full flags as pretrain_gpas.py would (its errors name the flag)."""
    import tempfile

    import yaml

    from megatron_ext.planning.arguments import parse_run_config

    with tempfile.TemporaryDirectory() as tmp:
        recipe = os.path.join(tmp, "recipe.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            yaml.safe_dump(cell.recipe(), f)
        try:
            cfg = parse_run_config(["--config", recipe, *spec.train_args])
        except SystemExit as err:  # argparse already printed what is wrong
            raise ConfigError("the shared training flags (after --) do not parse") from err
    return cfg.optim.train_iters
