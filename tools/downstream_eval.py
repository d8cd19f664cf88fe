#!/usr/bin/env python3
"""The downstream table: lm-evaluation-harness on several models, the paper's tasks by default.

Installed as ``gpas-downstream-eval`` too; usage and code: ``megatron_ext/cli/downstream_eval.py``.
"""

import sys

from megatron_ext.cli.downstream_eval import main

if __name__ == "__main__":
    sys.exit(main())
