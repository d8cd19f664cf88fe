#!/usr/bin/env python3
"""Run the paper's comparison: every size × norm type × seed as its own resumable run.

Installed as ``gpas-run-grid`` too; usage and code: ``megatron_ext/cli/run_grid.py``.
"""

import sys

from megatron_ext.cli.run_grid import main

if __name__ == "__main__":
    sys.exit(main())
