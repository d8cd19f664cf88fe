"""Command lines of the project's tools, as the tests run them."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
