"""Validation: Megatron-LM style (eval-iters global batches) or the reference's token budget;
the evaluator decides when it runs (``--eval-interval``, and once at the end)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from megatron_ext.config import EvalConfig
from megatron_ext.metrics_file import ValidationRecord
from megatron_ext.training.contract import EVALUATION, Component, RunContext, StepOutcome
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


class Evaluator(Component):
    """Runs validation every ``--eval-interval`` iterations and once at a normal end (unless
    the last iteration was just evaluated), and writes its records."""

    def __init__(
        self,
        cfg: EvalConfig,
        ctx: RunContext,
        make_iterators: Optional[Callable],
        *,
        per_document: bool,
    ):
        self.cfg, self.ctx = cfg, ctx
        self.make_iterators = make_iterators  # None: no validation data
        self.per_document = per_document

    def after_step(self, step: StepOutcome) -> None:
        if step.iteration % self.cfg.eval_interval == 0:
            self.run(step.iteration)

    def at_end(self, state, stopped: bool) -> None:
        """A run stopped early (signal, time limit, non-finite steps) is not evaluated."""
        if not stopped and state.iteration % self.cfg.eval_interval != 0:
            self.run(state.iteration)

    def run(self, iteration: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        if self.make_iterators is None or cfg.eval_iters == 0:
            return
        budget = (cfg.eval_tokens or DEFAULT_EVAL_TOKENS) if self.per_document else cfg.eval_tokens
        with ctx.phases.phase(EVALUATION):
            result = evaluate(
                self.make_iterators,
                ctx.model,
                num_microbatches=ctx.num_microbatches,
                seq_length=ctx.seq_length,
                micro_batch_size=ctx.micro_batch_size,
                max_batches=None if self.per_document else cfg.eval_iters,
                token_budget=budget,
            )
        record = ValidationRecord(iteration, result.loss, result.ppl, result.tokens, result.batches)
        ctx.metrics.write(record.as_dict())
        if ctx.is_logging_rank and result.loss is not None:
            logger.info(
                "validation at iteration %d | loss %.4f | ppl %.3f | %d tokens",
                iteration,
                result.loss,
                result.ppl,
                result.tokens,
            )
