"""What the tests share, not tests themselves: launching ranks, reference models, real text and
tokenizers, tool command lines, a local Slurm cluster, how workers share the cores."""

import os

#: The repository's root (the tests run its scripts and tools).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
