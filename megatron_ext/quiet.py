"""Third-party warnings off at the entry points, so every line a user sees is ours.

Called first thing by ``pretrain_gpas.py``, the tools and the quickstart, never on import of the
library (a user embedding it keeps their own warning settings). ``--verbose`` or a
``PYTHONWARNINGS`` setting brings everything back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

#: our own modules: their warnings always show
OURS = r"(megatron_ext|pretrain_gpas|tools|__main__)(\.|$)"

#: third-party loggers whose WARNING lines are advice for their own developers
#: (e.g. megatron-core's deprecation notes) rather than for a user of this project
CHATTY_LOGGERS = ("megatron.core",)


def wants_verbose(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or bool(os.environ.get("PYTHONWARNINGS"))


def quiet_third_party_warnings(argv: Optional[Sequence[str]] = None) -> bool:
    """Ignore warnings raised outside this project; returns whether it did."""
    if wants_verbose(argv):
        return False
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=OURS)
    # torch's own deprecation of the ShardedTensor megatron-core checkpoints use, raised inside
    # a torch call that the CPU emulation forwards, so attributed to our module.
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    # Warnings emitted while interpreter start-up hooks ran (setuptools' distutils hack) are
    # already printed; those raised later by imports are caught by the filters above.
    # Hugging Face's own progress bars and advisories (weight loading, hub) on exports.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("WANDB_SILENT", "true")  # our log line names the run and its files
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return True
