"""Validation: Megatron-LM style (eval-iters global batches) or the reference's token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_ext.training.step import evaluate_loss


@dataclass
class EvalResult:
    loss: Optional[float]
    tokens: int
    batches: int

    @property
    def ppl(self) -> Optional[float]:
        return math.exp(min(self.loss, 50.0)) if self.loss is not None else None


def evaluate(
    make_iterators,
    model,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    max_batches: Optional[int],
    token_budget: Optional[int],
) -> EvalResult:
    """Mean of per-batch mean losses over global batches, until ``max_batches`` or until more
    than ``token_budget`` non-pad tokens were seen (the reference protocol, without its
    off-by-one divisor). ``make_iterators`` returns fresh per-chunk iterators over the
    held-out samples."""
    iterators = make_iterators()
    losses, tokens, batches = [], 0, 0
    while (max_batches is None or batches < max_batches) and (
        token_budget is None or tokens <= token_budget
    ):
        try:
            loss, n = evaluate_loss(
                iterators,
                model,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                with_tokens=True,
            )
        except StopIteration:
            break
        if loss is not None:
            losses.append(loss)
        tokens += n
        batches += 1
    loss = sum(losses) / len(losses) if losses else None
    return EvalResult(loss, tokens, batches)
