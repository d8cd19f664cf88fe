"""Import a Hugging Face Llama (or a GPASForCausalLM export) as a pretrain_gpas.py checkpoint.

    python tools/convert_from_hf.py --hf-dir llama-1b --save runs/from-llama/checkpoints
    python pretrain_gpas.py --load runs/from-llama/checkpoints --save ... <printed model flags>

A Llama becomes the ``pre`` norm type. The checkpoint holds weights only: loading it starts a
run at iteration 0 under any TP/PP layout. The model flags to train it are printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.export.from_hf import UnsupportedModelError, import_from_hf  # noqa: E402
from megatron_ext.export.to_hf import DTYPES  # noqa: E402

logger = logging.getLogger("gpas.export")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf-dir", required=True, help="a Hugging Face model directory (safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to write (iter_0000000)")
    p.add_argument("--seq-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--tokenizer-type", default=None, help="recorded for a later export")
    p.add_argument("--tokenizer-model", default=None, help="recorded for a later export")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p.parse_args(argv)


@reports_missing_extras
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        logger.error("error: --hf-dir %s has no config.json", args.hf_dir)
        return 2
    tokenizer = None
    if args.tokenizer_model:
        tokenizer = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model}
    try:
        result = import_from_hf(
            args.hf_dir,
            args.save,
            seq_length=args.seq_length,
            dtype=DTYPES[args.dtype],
            tokenizer=tokenizer,
        )
    except (UnsupportedModelError, FileNotFoundError, KeyError, ValueError) as err:
        logger.error("error: %s", err)
        return 2
    logger.info("wrote %s", result.checkpoint)
    logger.info("model flags: %s", " ".join(result.training_flags()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
