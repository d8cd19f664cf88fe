#!/usr/bin/env python3
"""Export a training checkpoint (any TP/PP/DP layout) to Hugging Face.

Installed as ``gpas-convert-to-hf`` too; usage and code: ``megatron_ext/cli/convert_to_hf.py``.
"""

import sys

from megatron_ext.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
