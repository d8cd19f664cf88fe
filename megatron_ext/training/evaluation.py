"""Validation: Megatron-LM style (eval-iters global batches) or the reference's token budget;
the evaluator decides when it runs (``--eval-interval``, and once at the end)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from megatron_ext.metrics_file import ValidationRecord
from megatron_ext.training.step import evaluate_loss

logger = logging.getLogger("gpas")

DEFAULT_EVAL_TOKENS = 10_000_000  # the reference's per-document validation budget


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


class Evaluator:
    """Runs validation every ``--eval-interval`` iterations and once at a normal end (unless
    the last iteration was just evaluated), and writes its records."""

    def __init__(
        self,
        cfg,
        model,
        make_iterators: Optional[Callable],
        metrics,
        *,
        num_microbatches: int,
        speaks: bool,
    ):
        self.cfg, self.model, self.metrics = cfg, model, metrics
        self.make_iterators = make_iterators  # None: no validation data
        self.num_microbatches = num_microbatches
        self.speaks = speaks  # the logging rank prints the line

    def after_step(self, iteration: int) -> None:
        if iteration % self.cfg.eval.eval_interval == 0:
            self.run(iteration)

    def at_end(self, iteration: int, stopped: bool) -> None:
        """A run stopped early (signal, time limit, non-finite steps) is not evaluated."""
        if not stopped and iteration % self.cfg.eval.eval_interval != 0:
            self.run(iteration)

    def run(self, iteration: int) -> None:
        cfg = self.cfg
        if self.make_iterators is None or cfg.eval.eval_iters == 0:
            return
        per_doc = cfg.data.data_mode == "per-document"
        budget = (cfg.eval.eval_tokens or DEFAULT_EVAL_TOKENS) if per_doc else cfg.eval.eval_tokens
        result = evaluate(
            self.make_iterators,
            self.model,
            num_microbatches=self.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.optim.micro_batch_size,
            max_batches=None if per_doc else cfg.eval.eval_iters,
            token_budget=budget,
        )
        record = ValidationRecord(iteration, result.loss, result.ppl, result.tokens, result.batches)
        self.metrics.write(record.as_dict())
        if self.speaks and result.loss is not None:
            logger.info(
                "validation at iteration %d | loss %.4f | ppl %.3f | %d tokens",
                iteration,
                result.loss,
                result.ppl,
                result.tokens,
            )
