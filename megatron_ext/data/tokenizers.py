"""Tokenizers for preprocessing: SentencePiece models and Hugging Face ``tokenizers`` files.

Both encode batches of texts with native threads (the GIL is released), never add BOS, and
expose the end-of-document id appended by ``--append-eod``. SentencePiece follows T5's
semantics: ids are the model's own pieces (32,000 for T5's ``spiece.model``; the 100
``<extra_id_*>`` sentinels Hugging Face adds are not part of it), EOS is the model's ``</s>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from megatron_ext.config.run import TOKENIZER_TYPES


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or lacks something the run needs; the message says what."""


@dataclass
class Tokenizer:
    """What preprocessing needs of a tokenizer."""

    kind: str
    path: str
    vocab_size: int
    eod: Optional[int]
    _impl: object = None

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        if self.kind == "SentencePieceTokenizer":
            return self._impl.encode(list(texts), num_threads=threads)
        encodings = self._impl.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]


def _sentencepiece(path: str) -> Tokenizer:
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise TokenizerError(f"--tokenizer-model: no SentencePiece model at {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise TokenizerError(
            f"--tokenizer-model: {path} is not a SentencePiece model ({err})"
        ) from err
    eos = sp.eos_id()
    return Tokenizer(
        "SentencePieceTokenizer", path, sp.get_piece_size(), eos if eos >= 0 else None, sp
    )


_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def _huggingface(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenizerError(
            f"--tokenizer-model: no tokenizer.json at {file}; pass the file or its directory"
        )
    try:
        tok = HFTokenizer.from_file(file)
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"--tokenizer-model: {file} is not a tokenizers file ({err})") from err
    eos_token = None
    config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get("eos_token")
        eos_token = value.get("content") if isinstance(value, dict) else value
    candidates = ([eos_token] if eos_token else []) + list(_EOS_CANDIDATES)
    eod = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    return Tokenizer(
        "HuggingFaceTokenizer", file, tok.get_vocab_size(with_added_tokens=True), eod, tok
    )


def build_tokenizer(kind: str, path: str, eod_id: Optional[int] = None) -> Tokenizer:
    """Load a tokenizer; ``eod_id`` overrides (or supplies) its end-of-document id."""
    if kind == "SentencePieceTokenizer":
        tokenizer = _sentencepiece(path)
    elif kind == "HuggingFaceTokenizer":
        tokenizer = _huggingface(path)
    else:
        raise TokenizerError(
            f"--tokenizer-type: unknown {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if eod_id is not None:
        if not 0 <= eod_id < tokenizer.vocab_size:
            raise TokenizerError(
                f"--eod-id: {eod_id} is outside the vocabulary [0, {tokenizer.vocab_size})"
            )
        tokenizer.eod = eod_id
    return tokenizer
