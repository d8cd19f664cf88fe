#!/usr/bin/env python3
"""Tokenize JSON-lines corpora into megatron-core indexed datasets.

Installed as ``gpas-preprocess-data`` too; usage and code: ``megatron_ext/cli/preprocess_data.py``.
"""

import sys

from megatron_ext.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
