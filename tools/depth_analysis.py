#!/usr/bin/env python3
"""Depth analysis of finished models: layer importance, angular distance, residual RMS.

Installed as ``gpas-depth-analysis`` too; usage and code: ``megatron_ext/cli/depth_analysis.py``.
"""

import sys

from megatron_ext.cli.depth_analysis import main

if __name__ == "__main__":
    sys.exit(main())
