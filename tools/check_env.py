"""What the shell scripts ask of a Python installation, in one linted place.

    python tools/check_env.py missing torch megatron.core   # exit 0 if any is missing, else 1
    python tools/check_env.py device                        # cuda or cpu
    python tools/check_env.py versions                      # "torch X, megatron-core Y"

Only the standard library is imported at the top: ``missing`` must answer in an empty
environment, and ``device`` imports torch only when asked.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version


def is_importable(module: str) -> bool:
    """Whether ``module`` (dotted names allowed) can be imported; a missing parent package
    counts as missing rather than raising, as ``find_spec`` alone would."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    missing = sub.add_parser("missing", help="exit 0 if any module is missing, 1 if none is")
    missing.add_argument("modules", nargs="+")
    sub.add_parser("device", help="print cuda when torch sees a GPU, else cpu")
    sub.add_parser("versions", help="print the torch and megatron-core versions")
    args = parser.parse_args(argv)
    if args.command == "missing":
        absent = [m for m in args.modules if not is_importable(m)]
        return 0 if absent else 1
    if args.command == "device":
        import torch

        print("cuda" if torch.cuda.is_available() else "cpu")
        return 0
    print(f"torch {installed_version('torch')}, megatron-core {installed_version('megatron-core')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
