"""Tokenize supervised fine-tuning data (Commonsense170K's JSON array, JSON lines of the same
fields, chat records with ``messages``, or LMFlow's ``text_only`` / ``text2text`` files) into an
indexed dataset with a per-token loss mask: one example per sequence, or packed into blocks.

    python tools/preprocess_sft.py --input commonsense_170k.json \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model spiece.model \\
        --output-prefix data/cs170k --seq-length 256 --loss-on-prompt

    # the GPAS authors' recipe (LMFlow): every token trained, 512-token blocks
    python tools/preprocess_sft.py --input commonsense_170k.json --template llm-adapters \\
        --loss-on-prompt --pack --seq-length 512 ... --output-prefix data/cs170k_packed512

Writes ``PREFIX.bin/.idx`` (tokens), ``PREFIX.loss_mask.bin/.idx`` (1 where the loss counts)
and ``PREFIX.meta.json``. Train on it with ``pretrain_gpas.py --sft --data-path PREFIX``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.quiet import quiet_third_party_warnings

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.data.sft import (  # noqa: E402
    PACK_GROUP,
    TEMPLATES,
    SFTDataError,
    write_sft_dataset,
)
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
        "--template", choices=tuple(TEMPLATES), default="alpaca",
        help="how an instruction record is rendered: the Alpaca prompt as written, or exactly as "
        "LLM-Adapters' finetune.py renders it (its indentation and trailing spaces included)",
    )  # fmt: skip
    p.add_argument(
        "--pack", action="store_true",
        help="concatenate the examples and cut them into blocks of --seq-length tokens (LMFlow's "
        f"group texts: per {PACK_GROUP} examples, the tail that fills no block is dropped)",
    )  # fmt: skip
    p.add_argument(
        "--loss-on-prompt", action="store_true",
        help="loss on every token (the paper's recipe); default: the response only",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p


@reports_missing_extras
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
            template=args.template,
            pack=args.pack,
        )
    except (SFTDataError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
