"""The training tokenizer as Hugging Face tokenizer files.

A SentencePiece model is rebuilt as a ``tokenizers`` pipeline (normalizer, whitespace split,
BPE or Unigram model, decoder) from its own model proto, and the ``.model`` file is copied
beside it; a ``tokenizers`` file is copied as is. ``--verify`` checks the result encodes text to
the same ids as the original. One known difference: inside long runs of spaces (code, tables) a
BPE model can split the run differently, because SentencePiece ranks every split of a merged piece
equally while a ``tokenizers`` merge list must order them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.dataset_info import tokenizer_fingerprint

SPM_UNIGRAM, SPM_BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3  # SentencePiece piece types


@dataclass
class SpecialIds:
    bos: Optional[int] = None
    eos: Optional[int] = None
    pad: Optional[int] = None
    unk: Optional[int] = None


def _load_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE model: every split of a piece into two known pieces, the
    highest-scoring merged piece first (SentencePiece applies merges in that order)."""
    ranked = []
    for piece, score in scores.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def sentencepiece_to_tokenizers(path: str):
    """A ``tokenizers.Tokenizer`` that encodes like the SentencePiece model at ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _load_proto(path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.model_type == SPM_UNIGRAM:
        model = Unigram(
            [(piece, score) for piece, score, _ in pieces],
            unk_id=trainer.unk_id,
            byte_fallback=trainer.byte_fallback,
        )
    elif trainer.model_type == SPM_BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        scores = {piece: score for piece, score, kind in pieces if kind == _NORMAL}
        model = BPE(
            vocab=vocab,
            merges=_bpe_merges(vocab, scores),
            unk_token=pieces[trainer.unk_id][0],
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    else:
        raise ValueError(
            f"{path}: SentencePiece model type {trainer.model_type} is not supported "
            "(only unigram and BPE); pass a tokenizers file with --tokenizer-model instead"
        )
    tokenizer = Tokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    splits = []
    if trainer.split_digits:  # first, so that "▁▁3" keeps its whitespace run whole
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    if trainer.split_by_whitespace and trainer.allow_whitespace_only_pieces:
        # a run of spaces is one word, its last space starting the next word: "▁▁▁a" → ▁▁|▁a
        splits.append(pre_tokenizers.Split(Regex("▁?[^▁]+"), behavior="isolated"))
    elif trainer.split_by_whitespace:
        splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"))
    if splits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)

    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)

    # User-defined pieces stay in the model (SentencePiece matches them inside normalized text).
    specials = [piece for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    return tokenizer


def _special_ids(proto) -> SpecialIds:
    t = proto.trainer_spec

    def valid(i):
        return i if 0 <= i < len(proto.pieces) else None

    return SpecialIds(
        bos=valid(t.bos_id), eos=valid(t.eos_id), pad=valid(t.pad_id), unk=valid(t.unk_id)
    )


def export_tokenizer(tokenizer_type: str, path: str, out_dir: str) -> SpecialIds:
    """Write tokenizer.json and tokenizer_config.json for ``path`` into ``out_dir``."""
    if tokenizer_type == "SentencePieceTokenizer":
        proto = _load_proto(path)
        ids = _special_ids(proto)
        sentencepiece_to_tokenizers(path).save(os.path.join(out_dir, "tokenizer.json"))
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
        tokens = {k: proto.pieces[i].piece for k, i in vars(ids).items() if i is not None}
    elif tokenizer_type == "HuggingFaceTokenizer":
        source = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        shutil.copyfile(source, os.path.join(out_dir, "tokenizer.json"))
        ids, tokens = SpecialIds(), {}
    else:
        raise ValueError(f"cannot export a {tokenizer_type}")
    config = {
        # the trained-with tokenizer, as preprocessing recorded it next to each dataset
        "gpas_tokenizer_fingerprint": tokenizer_fingerprint(path),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        "add_bos_token": False,  # training never prepended BOS (documents end with EOD)
        "clean_up_tokenization_spaces": False,
        **{f"{k}_token": v for k, v in tokens.items()},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return ids
