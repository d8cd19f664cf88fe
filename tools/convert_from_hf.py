#!/usr/bin/env python3
"""Import a Hugging Face Llama (or a GPAS export) as a training checkpoint.

Installed as ``gpas-convert-from-hf`` too; usage and code: ``megatron_ext/cli/convert_from_hf.py``.
"""

import sys

from megatron_ext.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
