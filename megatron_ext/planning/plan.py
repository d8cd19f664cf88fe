"""``--dry-run``: the layout, size, memory estimate and token budget of a run, without building
anything. Plan the :func:`~megatron_ext.planning.resolve.resolve_run` result (the vocabulary of
the tokenizer, the iterations of ``--epochs``), so that the plan is the run training builds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_ext.config import RunConfig
from megatron_ext.models.params import count_parameters


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    global_batch: int
    num_microbatches: int
    params_total: int
    params_per_gpu: int
    weights_and_optimizer_gib: float
    activations_gib: float
    tokens_per_iteration: int
    total_tokens: int
    train_iters: int = 0
    device: str = "cuda"
    lisa: Optional[str] = None  # what LISA computes and allocates
    data: Optional[DataTokens] = None  # with a real dataset: what the slots hold

    def lines(self) -> list[str]:
        total = self.weights_and_optimizer_gib + self.activations_gib
        ranks, rank = ("GPUs", "GPU") if self.device == "cuda" else ("CPU ranks", "rank")
        return [
            f"layout: {self.world_size} {ranks} = TP {self.tp} × PP {self.pp} × DP {self.dp}",
            f"batch: global {self.global_batch} sequences = {self.num_microbatches} "
            f"micro-batches per DP rank; {self.tokens_per_iteration:,} token slots per iteration",
            f"training: {self.train_iters:,} iterations, {self.total_tokens / 1e9:,.2f}B token "
            "slots in total",
            f"parameters: {self.params_total:,} ({self.params_total / 1e6:,.1f}M) in total, "
            f"≈{self.params_per_gpu / 1e6:,.1f}M on the most loaded {rank}",
            f"memory per {rank} (estimate): weights+grads+optimizer "
            f"{self.weights_and_optimizer_gib:.1f} GiB, "
            f"activations {self.activations_gib:.1f} GiB, total {total:.1f} GiB",
            *([self.data.line(self.total_tokens)] if self.data else []),
            *([self.lisa] if self.lisa else []),
        ]


@dataclass(frozen=True)
class DataTokens:
    """What the token slots of a run hold, from the training split's document lengths."""

    mode: str
    documents: int
    tokens: int  # in the training split
    real_tokens: int  # the run's non-padding input tokens
    epochs: float  # passes over the training split

    def line(self, slots: int) -> str:
        head = (
            f"data: {self.documents:,} documents, {_count(self.tokens)} tokens in the "
            f"training split; {self.epochs:,.2f} epochs over it"
        )
        if self.mode == "packed":
            return f"{head}; packed: every slot a real token ({_count(self.real_tokens)})"
        return (
            f"{head}; {self.mode}: ≈{_count(self.real_tokens)} real tokens "
            f"({self.real_tokens / slots:.1%} of the slots, the rest padding)"
        )


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def data_tokens(run) -> Optional[DataTokens]:
    """The real tokens a resolved run trains on (None for mock data): packed samples are all
    real tokens; a per-document sample holds its document's first ``seq_length`` tokens (the
    last one the EOD that ends each document) and padding. A blend's prefixes share the samples
    by their weights, unweighted ones by their size (tokens packed, documents per-document, as
    megatron-core sizes them); the epochs are the most any prefix is read."""
    from megatron_ext.planning.preflight import train_split_lengths

    cfg = run.cfg
    if cfg.data.mock_data or cfg.data.data_mode == "sft":
        return None
    parts = train_split_lengths(cfg.data)
    if not parts:
        return None
    mode, seq = cfg.data.data_mode, cfg.model.seq_length
    samples = cfg.optim.train_iters * run.global_batch_size
    sizes = [int(lengths.sum(dtype="int64")) for _, _, lengths in parts]
    if mode != "packed":
        sizes = [len(lengths) for _, _, lengths in parts]
    weights = [w if w is not None else size for (_, w, _), size in zip(parts, sizes, strict=True)]
    real, epochs = 0.0, 0.0
    for (_, _, lengths), weight, size in zip(parts, weights, sizes, strict=True):
        mine = samples * weight / sum(weights)
        if mode == "packed":
            real += mine * seq
            epochs = max(epochs, mine * seq / max(size, 1))
        else:
            real += mine * (float(np.minimum(lengths, seq).mean(dtype="float64")) if size else 0.0)
            epochs = max(epochs, mine / max(size, 1))
    documents = sum(len(lengths) for _, _, lengths in parts)
    tokens = sum(int(lengths.sum(dtype="int64")) for _, _, lengths in parts)
    return DataTokens(mode, documents, tokens, int(real), epochs)


def smallest_world(cfg: RunConfig) -> int:
    """The fewest ranks the layout takes (one data-parallel replica)."""
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size


def plan_run(cfg: RunConfig, world_size: int, data: Optional[DataTokens] = None) -> Plan:
    cfg.validate(world_size)
    m, par, o = cfg.model, cfg.parallel, cfg.optim
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = par.data_parallel_size(world_size)
    count = count_parameters(m, padded_vocab=True)
    # Most loaded stage: its share of the layers plus one (untied) vocabulary matrix.
    per_gpu = (count.non_embedding / pp + count.embedding / 2) / tp
    if o.bf16:
        state_bytes = 2 + 4 + (12 / dp if par.use_distributed_optimizer else 12)
    else:
        state_bytes = 4 + 4 + (8 / dp if par.use_distributed_optimizer else 8)
    s, b, h, a = m.seq_length, o.micro_batch_size, m.hidden_size, m.num_attention_heads
    act_bytes = 2 if o.bf16 else 4
    if o.recompute_granularity == "full":
        per_layer = s * b * h * act_bytes  # layer inputs only
    else:  # Korthikanti et al. (2022): s·b·h·(34 + 5·a·s/h) bytes in 16-bit, divided over TP
        per_layer = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2 / tp
    in_flight = min(pp, cfg.num_microbatches(world_size))  # 1F1B warm-up on the first stage
    activations = per_layer * (m.num_layers / pp) * in_flight
    gbs = cfg.global_batch_size(world_size)
    k, layers = cfg.sft.lisa_layers, m.num_layers
    lisa = None
    if 0 < k < layers:
        share = (count.embedding + count.non_embedding * k / layers) / count.total
        lisa = (
            f"LISA: {k} of {layers} layers train at a time: weight gradients for ≈{share:.0%} of "
            "the parameters per step; main gradients and Adam state are allocated for all of "
            "them (the estimate above)"
        )
    return Plan(
        world_size,
        tp,
        pp,
        dp,
        gbs,
        cfg.num_microbatches(world_size),
        count.total,
        int(per_gpu),
        per_gpu * state_bytes / 2**30,
        activations / 2**30,
        gbs * s,
        gbs * s * o.train_iters,
        o.train_iters,
        cfg.device,
        lisa,
        data,
    )
