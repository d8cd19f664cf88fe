#!/usr/bin/env python3
"""Collect a grid's final validation results into the paper's table.

Installed as ``gpas-grid-table`` too; usage and code: ``megatron_ext/cli/grid_table.py``.
"""

import sys

from megatron_ext.cli.grid_table import main

if __name__ == "__main__":
    sys.exit(main())
