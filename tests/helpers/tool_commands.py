"""Command lines of the project's tools, as the tests run them."""

import os
import sys

from tests.helpers import ROOT


def preprocess_command(inputs, tokenizer_type: str, tokenizer_model: str, *extra: str) -> list:
    """tools/preprocess_data.py over ``inputs`` (a path or a list of paths) plus ``extra`` flags."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    return [
        sys.executable,
        os.path.join(ROOT, "tools", "preprocess_data.py"),
        "--input",
        *map(str, inputs),
        "--tokenizer-type",
        tokenizer_type,
        "--tokenizer-model",
        str(tokenizer_model),
        *extra,
    ]


#: a tiny pre_gpas run on mock data, one process, CPU (add --train-iters and the rest)
TINY_CPU_RUN = [
    "--device", "cpu", "--model-size", "tiny", "--norm-type", "pre_gpas", "--mock-data",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--num-workers", "0",
]  # fmt: skip


def grid_command(subcommand: str, out, norm_types, seeds, *extra: str) -> list:
    """tools/run_grid.py SUBCOMMAND over the tiny size; ``extra`` holds its own flags and, after
    ``--``, the shared training flags."""
    return [
        sys.executable,
        os.path.join(ROOT, "tools", "run_grid.py"),
        subcommand,
        "--out",
        str(out),
        "--sizes",
        "tiny",
        "--norm-types",
        *norm_types,
        "--seeds",
        *map(str, seeds),
        *extra,
    ]
