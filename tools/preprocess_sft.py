#!/usr/bin/env python3
"""Tokenize supervised fine-tuning data into an indexed dataset with a per-token loss mask.

Installed as ``gpas-preprocess-sft`` too; usage and code: ``megatron_ext/cli/preprocess_sft.py``.
"""

import sys

from megatron_ext.cli.preprocess_sft import main

if __name__ == "__main__":
    sys.exit(main())
