"""The conventions every config section follows: a field is declared once with its type, default
and one-line help (:func:`option`); a field whose values are a fixed set is typed ``Literal[...]``
(checked by :func:`check_choices`); every check raises :class:`ConfigError` through
:func:`require`, naming the flag to change."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag to change."""


def flag(field_name: str) -> str:
    """The command-line flag of a config field (``post_num`` → ``--post-num``)."""
    return field_name if field_name.startswith("--") else "--" + field_name.replace("_", "-")


def require(condition: bool, name: str, message: str) -> None:
    """Raise ``ConfigError("--flag: message")`` unless ``condition``; ``name`` is a field name
    or a flag."""
    if not condition:
        raise ConfigError(f"{flag(name)}: {message}")


def option(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING,
           unknown: str = ""):  # fmt: skip
    """A config field with its one-line help (``--help`` shows it). ``unknown`` names what a
    Literal field's values are, for its error (``unknown norm type 'x'``)."""
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"help": help, "unknown": unknown},
    )


def choices_of(hint) -> Optional[tuple]:
    """The values of a ``Literal`` (or ``Optional[Literal]``) field type, else None."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_choices(section) -> None:
    """Every Literal field of ``section`` holds one of its values (None where Optional)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        choices = choices_of(hints[f.name])
        value = getattr(section, f.name)
        if choices is None or (value is None and type(None) in typing.get_args(hints[f.name])):
            continue
        what = f.metadata.get("unknown")
        message = f"choose one of {', '.join(map(str, choices))}"
        require(
            value in choices, f.name, f"unknown {what} {value!r}; {message}" if what else message
        )
