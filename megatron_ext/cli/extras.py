"""A command whose optional pieces are missing says, in one line, which extra installs them
(``--help`` works without them: the commands import optional packages where they use them)."""

from __future__ import annotations

import functools
import sys

from megatron_ext.resilience import exit_codes

#: top-level module → the setup.py extra that installs it
EXTRA_OF_MODULE = {
    "safetensors": "hf",
    "transformers": "hf",
    "google": "hf",  # protobuf: reading a SentencePiece model's pieces for the export
    "lm_eval": "eval",
    "accelerate": "eval",
    "matplotlib": "plot",
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "zstandard": "zst",
    "nvidia_resiliency_ext": "resilience",
}


def missing_extra_message(err: ModuleNotFoundError) -> str | None:
    """The one line for a missing optional package (None: not an optional one)."""
    top = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"error: {top} is not installed; this needs the '{extra}' extra: "
        f"pip install -e '.[{extra}]' in the repository (or pip install 'gpas-megatron[{extra}]')"
    )


def reports_missing_extras(main):
    """Wrap a command's ``main(argv) -> int``: a missing optional package is one line, exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except ModuleNotFoundError as err:
            message = missing_extra_message(err)
            if message is None:
                raise
            print(message, file=sys.stderr)
            return exit_codes.BAD_INPUT

    return wrapper
