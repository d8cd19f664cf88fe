#!/usr/bin/env python3
"""Plot runs side by side from their metrics files.

Installed as ``gpas-plot-run`` too; usage and code: ``megatron_ext/cli/plot_run.py``.
"""

import sys

from megatron_ext.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
