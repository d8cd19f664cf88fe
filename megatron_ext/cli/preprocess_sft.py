"""Tokenize supervised fine-tuning data (Commonsense170K's JSON array, JSON lines of the same
fields, or chat records with ``messages``) into an indexed dataset with a per-token loss mask.

    python tools/preprocess_sft.py --input commonsense_170k.json \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model spiece.model \\
        --output-prefix data/cs170k --seq-length 256 --loss-on-prompt

Writes ``PREFIX.bin/.idx`` (tokens), ``PREFIX.loss_mask.bin/.idx`` (1 where the loss counts)
and ``PREFIX.meta.json``. Train on it with ``pretrain_gpas.py --sft --data-path PREFIX``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.quiet import quiet_third_party_warnings

quiet_third_party_warnings()

from megatron_ext.data.sft import SFTDataError, write_sft_dataset  # noqa: E402
from megatron_ext.data.tokenizers import (  # noqa: E402
    TOKENIZER_TYPES,
    TokenizerError,
    build_tokenizer,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="JSON array or JSON-lines files")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--eod-id", type=int, default=None, help="if the tokenizer names none")
    p.add_argument("--output-prefix", required=True)
    p.add_argument(
        "--seq-length", type=int, default=None,
        help="training sequence length: longer examples are truncated (or dropped)",
    )  # fmt: skip
    p.add_argument("--long-examples", choices=("truncate", "drop"), default="truncate")
    p.add_argument(
        "--loss-on-prompt", action="store_true",
        help="loss on every token (the paper's recipe); default: the response only",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_id)
        summary = write_sft_dataset(
            args.input,
            tokenizer,
            args.output_prefix,
            seq_length=args.seq_length,
            long_examples=args.long_examples,
            loss_on_prompt=args.loss_on_prompt,
        )
    except (SFTDataError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
