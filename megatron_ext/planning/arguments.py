"""Command line and YAML config → :class:`RunConfig`.

Every config field is a flag of the same name (``micro_batch_size`` → ``--micro-batch-size``),
which keeps Megatron-LM's names where they exist; its type and help come from the field.
``--model-size`` picks a preset whose fields any explicit model flag overrides.
``--config run.yaml`` may set any flag (keys with dashes or underscores); the command line
overrides the file (``--no-FLAG`` turns a boolean off).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import os
import typing
from typing import Optional

import yaml

from megatron_ext.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    flag,
)
from megatron_ext.models.presets import PRESET_NAMES, model_preset

#: RunConfig's sections ({"optim": OptimConfig, …}); each field of each is a flag
SECTIONS = {
    f.name: hint
    for f in dataclasses.fields(RunConfig)
    if dataclasses.is_dataclass(hint := typing.get_type_hints(RunConfig)[f.name])
}
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS)


def _argument(hint) -> dict:
    """argparse settings of a field from its type: ``--flag/--no-flag`` for a bool, ``nargs``
    for a list, the element type else (a Literal's values are checked by validation, so that a
    bad value is one ``error:`` line like every other)."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:  # --flag / --no-flag, so a command line can undo a YAML recipe's true
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) in (list, collections.abc.Sequence):
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if typing.get_origin(hint) is typing.Literal:
        return {"type": type(typing.get_args(hint)[0]), "metavar": "{" + ",".join(
            map(str, typing.get_args(hint))) + "}"}  # fmt: skip
    return {"type": hint}


def _add_fields(group, cls, names=None, section: Optional[str] = None) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        dest = f"{section}.{f.name}" if section else f.name
        kwargs = _argument(hints[f.name])
        if "action" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        help_text = (f.metadata.get("help") or "").replace("%", "%%") or None  # argparse
        group.add_argument(flag(f.name), dest=dest, default=None, help=help_text, **kwargs)


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
        _add_fields(p.add_argument_group(section), cls, section=section)
    _add_fields(p.add_argument_group("runtime"), RunConfig, names=TOP_LEVEL)
    _add_command_options(p.add_argument_group("command (not part of the run's configuration)"))
    return p


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """How this command runs, not what the run is: never read from ``--config``, never saved."""

    dry_run: bool = False
    prepare_data_only: bool = False
    world_size: Optional[int] = None
    verbose: bool = False  # read from argv by quiet.py before any import; here for --help


_COMMAND = "command."  # the dest prefix of CommandOptions' flags


def _add_command_options(group) -> None:
    group.add_argument(
        "--dry-run",
        dest=_COMMAND + "dry_run",
        action="store_true",
        help="check the flags and files as training would, then print the layout, parameter "
        "count, memory per rank and token budget; train nothing",
    )
    group.add_argument(
        "--prepare-data-only",
        dest=_COMMAND + "prepare_data_only",
        action="store_true",
        help="build the packed data index cache that training with the same flags will look "
        "for, in this one process (before the job, on a CPU node), then exit",
    )
    group.add_argument(
        "--world-size",
        dest=_COMMAND + "world_size",
        type=int,
        metavar="N",
        help="with --dry-run or --prepare-data-only: the ranks of the planned job (default: "
        "$WORLD_SIZE, else the smallest layout; needed when --global-batch-size is not given)",
    )
    group.add_argument(
        "--verbose",
        dest=_COMMAND + "verbose",
        action="store_true",
        help="keep third-party warnings (hidden by default)",
    )


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
        if a.option_strings and not a.dest.startswith(_COMMAND)
    }
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in dests or name == "config":
            raise ConfigError(f"--config: {path}: unknown key {key!r} (keys are flag names)")
        out[dests[name]] = value
    return out


def parse_command_line(argv: Optional[list] = None) -> tuple[RunConfig, CommandOptions]:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = vars(parser.parse_args(argv))
    command = CommandOptions(**{
        k[len(_COMMAND):]: v for k, v in args.items() if k.startswith(_COMMAND)
    })  # fmt: skip
    return run_config_from_values(args, model_size=args.get("model_size")), command


def parse_run_config(argv: Optional[list] = None) -> RunConfig:
    """The run's configuration alone (a grid cell's, a recipe's test): the command's own flags
    would be ignored there, so they are refused."""
    cfg, command = parse_command_line(argv)
    given = [f.name for f in dataclasses.fields(command) if getattr(command, f.name) not in
             (None, False) and f.name != "verbose"]  # fmt: skip
    if given:
        raise ConfigError(
            f"{flag(given[0])}: an option of the pretrain_gpas.py command, not of a run's "
            "configuration; leave it out here"
        )
    return cfg


def run_config_from_values(values: dict, model_size: Optional[str] = None) -> RunConfig:
    """Build a RunConfig from {"section.field": value} (None = not given)."""
    sections = {}
    if values.get("sft.sft") and values.get("data.data_mode") is None:
        values = {**values, "data.data_mode": "sft"}  # --sft reads SFT datasets
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


def flags_reference() -> str:
    """Every flag of ``pretrain_gpas.py`` as markdown, one table per group with its default:
    ``docs/flags.md`` is this text (a test keeps it so)."""
    defaults = run_config_from_values({})
    lines = [
        "# Every flag of `pretrain_gpas.py`",
        "",
        "Generated from the configuration (`megatron_ext/config/`) by",
        "`python -c 'from megatron_ext.planning.arguments import flags_reference; "
        'print(flags_reference(), end="")\' > docs/flags.md`;',
        "`tests/unit/test_flags_reference.py` fails when it is stale. Any flag can also be set",
        "in a `--config` YAML file (the key is the flag's name); `--model-size` presets fill the",
        "model flags, and explicit ones override the preset. The default shown is the one",
        "without a preset.",
        "",
    ]
    for group in build_parser()._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | what |", "|---|---|---|"]
        for a in actions:
            names = " / ".join(f"`{o}`" for o in a.option_strings)
            what = (a.help or "").replace("|", "\\|").replace("%%", "%")
            lines.append(f"| {names} | {_default_text(defaults, a)} | {what} |")
        lines.append("")
    return "\n".join(lines)


def _default_text(defaults: RunConfig, action) -> str:
    if action.dest.startswith(_COMMAND) or "." not in action.dest and action.dest not in TOP_LEVEL:
        return ""
    obj = defaults
    for part in action.dest.split("."):
        obj = getattr(obj, part)
    if obj is None or obj == []:
        return ""
    return f"`{' '.join(map(str, obj)) if isinstance(obj, list) else obj}`"
