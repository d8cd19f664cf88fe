"""Tokenize JSON-lines corpora (C4 shards, .jsonl, .json.gz, .zst) into megatron-core indexed
datasets: one .bin/.idx per input shard under ``PREFIX_shards/``, merged into
``PREFIX_text_document.bin/.idx``. Re-running skips complete shards.

Example (C4, T5 tokenizer, 16 processes):

    python tools/preprocess_data.py --input 'c4/en/c4-train.*.json.gz' \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model spiece.model \\
        --append-eod --output-prefix data/c4 --workers 16
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.data.preprocess import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    run_preprocess,
)
from megatron_ext.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, globs (quoted) or directories of .json/.jsonl(.gz/.zst)",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON field(s) to tokenize; one output dataset per key (default: text)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed record instead of skipping it",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model, or a tokenizer.json (or its directory)",
    )
    g.add_argument(
        "--append-eod",
        action="store_true",
        help="append the tokenizer's end-of-document token to every document",
    )
    g.add_argument(
        "--eod-id",
        type=int,
        default=None,
        help="end-of-document id, for tokenizers without one (or to override it)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", default=None, help="writes PREFIX_<key>_document.bin/.idx")
    g.add_argument("--stats", action="store_true", help="count documents and tokens; write nothing")
    g.add_argument("--no-merge", action="store_true", help="leave the per-shard outputs unmerged")
    g.add_argument(
        "--merge-only",
        action="store_true",
        help="only merge complete per-shard outputs of an earlier run",
    )
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes/threads in total (default: all cores)",
    )
    g.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="with --num-shards: process input shards i, i+n, i+2n, … (array jobs)",
    )
    g.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="split the input shards over this many jobs (implies --no-merge)",
    )
    g.add_argument("--batch-size", type=int, default=1024, help="documents per tokenizer call")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p.parse_args(argv)


@reports_missing_extras
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        eod_id=args.eod_id,
        workers=args.workers,
        strict=args.strict,
        stats_only=args.stats,
        merge=not args.no_merge,
        merge_only=args.merge_only,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        batch_docs=args.batch_size,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        summary = run_preprocess(cfg)
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
