"""Python steps of tools/install_te_offline.sh, kept here so the linter sees them.

python tools/te_offline_helpers.py include-dirs TARGET   # CPATH for compiling the bindings
python tools/te_offline_helpers.py check                 # one te.Linear on the GPU
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig


def include_dirs(target: str) -> list[str]:
    """TARGET/include (the cuDNN frontend's headers) and every include directory of the
    nvidia-* wheels torch depends on (cuDNN, NCCL)."""
    dirs = [os.path.join(target, "include")]
    for root in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
        pattern = os.path.join(root, "nvidia", "**", "include")
        dirs += sorted(glob.glob(pattern, recursive=True))
    return [d for d in dirs if os.path.isdir(d)]


def check() -> str:
    import torch
    import transformer_engine
    import transformer_engine.pytorch as te

    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    y = te.Linear(64, 64, params_dtype=torch.bfloat16)(x)
    version = transformer_engine.__version__
    return f"Transformer Engine {version} works: te.Linear -> {tuple(y.shape)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("include-dirs").add_argument("target")
    sub.add_parser("check")
    args = parser.parse_args(argv)
    if args.command == "include-dirs":
        print(":".join(include_dirs(args.target)))
    else:
        print(check())
    return 0


if __name__ == "__main__":
    sys.exit(main())
