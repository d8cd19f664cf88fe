"""Train a small SentencePiece tokenizer (BPE, byte fallback) on JSON-lines documents.

    python tools/train_tokenizer.py --input corpus/train.jsonl --vocab-size 4096 \\
        --output runs/tok/spm4k.model
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.data.tokenizer_training import (  # noqa: E402
    TokenizerTrainingConfig,
    TokenizerTrainingError,
    train_sentencepiece,
)


@reports_missing_extras
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="JSON-lines files (.gz/.zst too)")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-documents", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    args = p.parse_args(argv)
    cfg = TokenizerTrainingConfig(
        inputs=args.input,
        output=args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        json_key=args.json_key,
        max_documents=args.max_documents,
        threads=args.threads,
    )
    t0 = time.perf_counter()
    try:
        path = train_sentencepiece(cfg)
    except TokenizerTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({cfg.vocab_size} pieces, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
