"""The run that will happen, worked out once from the flags and the files they name: the
vocabulary from the tokenizer, ``--train-iters`` from ``--epochs``, the batch arithmetic, every
file checked against the flags. Training, ``--dry-run`` and the recipes' tests all start here, so
what a dry run prints is what training builds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_ext.config import ConfigError, RunConfig
from megatron_ext.planning import preflight


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # validated, with the tokenizer's vocabulary and the iterations --epochs gives
    world_size: int
    eod: int
    samples_per_epoch: Optional[int]  # with --epochs: what one pass over the training split is
    undescribed_data: tuple  # dataset prefixes without a sidecar (checked batch by batch)

    @property
    def global_batch_size(self) -> int:
        return self.cfg.global_batch_size(self.world_size)

    @property
    def num_microbatches(self) -> int:
        return self.cfg.num_microbatches(self.world_size)


def resolve_run(cfg: RunConfig, world_size: int) -> ResolvedRun:
    """Check the flags, then the files, then the fields that depend on them; the caller's
    configuration is not changed. Raises :class:`ConfigError` (one line) on the first problem."""
    cfg.validate(world_size)  # the flags alone, before any file is opened
    vocab, eod = vocab_and_eod(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    undescribed = preflight.check_run(cfg, eod)
    samples = None
    if cfg.sft.epochs is not None:
        samples = preflight.train_examples(cfg.data, cfg.model.seq_length)
        iters = max(1, math.ceil(cfg.sft.epochs * samples / cfg.global_batch_size(world_size)))
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, train_iters=iters))
    cfg.validate(world_size)  # what was resolved (the vocabulary against TP, the iterations)
    return ResolvedRun(cfg, world_size, eod, samples, tuple(undescribed))


def vocab_and_eod(cfg: RunConfig) -> tuple[int, int]:
    """The model's vocabulary and the EOD id, from the tokenizer the flags name."""
    from megatron_ext.data.tokenizers import TokenizerError, build_tokenizer

    t = cfg.tokenizer
    if t.tokenizer_type == "NullTokenizer":
        # Megatron's null tokenizer: ids < vocab_size, EOD = vocab_size (hence one more row).
        return cfg.model.vocab_size + 1, t.eod_id if t.eod_id is not None else cfg.model.vocab_size
    try:
        tok = build_tokenizer(t.tokenizer_type, t.tokenizer_model, t.eod_id)
    except TokenizerError as err:
        raise ConfigError(f"{err}; check the flag") from err
    if tok.eod is None:
        raise ConfigError(
            f"--eod-id: tokenizer {t.tokenizer_model} has no end-of-document token; pass --eod-id N"
        )
    return tok.vocab_size, tok.eod
