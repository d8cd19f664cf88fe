"""Export a pretrain_gpas.py checkpoint (any TP/PP/DP layout) to Hugging Face.

    python tools/convert_to_hf.py --load runs/1b/checkpoints --output exports/1b --verify

--target llama   a stock LlamaForCausalLM through the exact fold of GPAS / LNS (pre, lns,
                 pre_gpas, lns_gpas); loads without remote code (vLLM, lm-eval, every Llama tool)
--target gpas    GPASForCausalLM for every norm type, loaded with trust_remote_code=True
--target auto    llama where the model folds, else gpas (default)

Runs on one CPU process and holds about one output shard plus one layer in memory. The output is
written to OUTPUT.tmp and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.export.dcp_reader import CheckpointError  # noqa: E402
from megatron_ext.export.llama_fold import FoldError  # noqa: E402
from megatron_ext.export.to_hf import DTYPES, TARGETS, ExportOptions, export_to_hf  # noqa: E402

logger = logging.getLogger("gpas.export")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="the --save directory, or one iter_XXXXXXX in it")
    p.add_argument("--output", required=True, help="directory to write the Hugging Face model to")
    p.add_argument("--target", choices=TARGETS, default="auto")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: the checkpoint's dtype"
    )
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB)")
    p.add_argument("--tokenizer-type", default=None, help="default: the one the run used")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the run used")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run our model and the export on the same tokens; exit 1 above --verify-tolerance",
    )
    p.add_argument("--verify-text", default=None, help="a text file to verify on")
    p.add_argument(
        "--verify-tolerance",
        type=float,
        default=None,
        help="max |Δlogits| allowed (default 1e-3 for float32 exports, 0.1 for 16-bit)",
    )
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p.parse_args(argv)


@reports_missing_extras
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    opts = ExportOptions(
        checkpoint=args.load,
        output=args.output,
        target=args.target,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        overwrite=args.overwrite,
    )
    try:
        result = export_to_hf(opts)
    except (CheckpointError, FoldError, FileExistsError, FileNotFoundError, ValueError) as err:
        logger.error("error: %s", err)
        return 2
    logger.info(
        "exported %s as %s (%s, %.1f MB in %d file(s)) to %s in %.1f s",
        result.norm_type,
        "LlamaForCausalLM" if result.target == "llama" else "GPASForCausalLM",
        str(result.dtype).replace("torch.", ""),
        result.num_bytes / 1e6,
        len(result.files),
        result.output,
        result.seconds,
    )
    if not args.verify:
        return 0
    from megatron_ext.export.verify import verify_export

    text = open(args.verify_text, encoding="utf-8").read() if args.verify_text else None
    report = verify_export(args.load, args.output, text)
    tolerance = args.verify_tolerance
    if tolerance is None:
        tolerance = 1e-3 if result.dtype == DTYPES["float32"] else 0.1
    logger.info("verify: %s", report.summary())
    if not report.passed(tolerance):
        logger.error("verify FAILED: tolerance %.3g", tolerance)
        return 1
    logger.info("verify passed (tolerance %.3g)", tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
