#!/usr/bin/env python3
"""Train a small SentencePiece tokenizer on JSON-lines documents.

Installed as ``gpas-train-tokenizer`` too; usage and code: ``megatron_ext/cli/train_tokenizer.py``.
"""

import sys

from megatron_ext.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
