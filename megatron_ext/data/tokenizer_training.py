"""Train a small SentencePiece model on JSON-lines documents.

A 32k vocabulary makes a CPU-sized model mostly embedding; a few thousand pieces trained in
seconds on the run's own corpus keep the tokenizer real (BPE, byte fallback, the usual special
ids unk/bos/eos = 0/1/2) while the compute goes into the layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_ext.data.jsonl_reader import RecordReader


class TokenizerTrainingError(ValueError):
    """Bad input or options for tokenizer training; the message names the flag or file."""


@dataclass
class TokenizerTrainingConfig:
    inputs: Sequence[str]  # JSON-lines files (plain, .gz or .zst)
    output: str  # the .model file to write
    vocab_size: int = 4096
    model_type: str = "bpe"
    json_key: str = "text"
    max_documents: int = 20_000  # documents sampled from the start of the inputs
    max_chars_per_document: int = 4_000
    threads: int = 2

    def validate(self) -> None:
        if not self.inputs:
            raise TokenizerTrainingError("--input: give at least one JSON-lines file")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise TokenizerTrainingError(f"--input: {path} does not exist")
        if not self.output.endswith(".model"):
            raise TokenizerTrainingError(f"--output: {self.output} must end in .model")
        if self.vocab_size < 260:  # 256 byte pieces + specials
            raise TokenizerTrainingError(
                f"--vocab-size {self.vocab_size}: byte fallback needs at least 260 pieces"
            )
        if self.model_type not in ("bpe", "unigram"):
            raise TokenizerTrainingError(f"--model-type: {self.model_type!r} is not bpe or unigram")


def _sentences(cfg: TokenizerTrainingConfig) -> Iterator[str]:
    """Lines of the first ``max_documents`` documents (SentencePiece trains on lines)."""
    seen = 0
    for path in cfg.inputs:
        for batch in RecordReader(path, [cfg.json_key]).batches():
            for text in batch[0]:
                for line in text[: cfg.max_chars_per_document].splitlines():
                    if line.strip():
                        yield line
                seen += 1
                if seen >= cfg.max_documents:
                    return


def train_sentencepiece(cfg: TokenizerTrainingConfig) -> str:
    """Write ``cfg.output`` (atomically: a temporary name, then a rename); returns its path."""
    import sentencepiece as spm

    cfg.validate()
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = os.path.abspath(cfg.output)[: -len(".model")] + ".tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(cfg),
            model_prefix=tmp_prefix,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=0.9995,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=cfg.threads,
            minloglevel=2,  # no per-step training chatter
        )
    except RuntimeError as err:
        raise TokenizerTrainingError(
            f"SentencePiece training on {', '.join(cfg.inputs)} failed: {err} "
            "(check --vocab-size against the text: more distinct characters than pieces needs "
            "a larger one, too little text a smaller one)"
        ) from err
    os.replace(tmp_prefix + ".model", cfg.output)
    vocab_file = tmp_prefix + ".vocab"
    if os.path.exists(vocab_file):
        os.replace(vocab_file, cfg.output[: -len(".model")] + ".vocab")
    return cfg.output
