#!/usr/bin/env python3
"""Pretrain a Llama-style model with GPAS or one of its normalization baselines.

Installed as ``gpas-pretrain`` too; usage and code: ``megatron_ext/cli/pretrain.py``.
"""

import sys

from megatron_ext.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
