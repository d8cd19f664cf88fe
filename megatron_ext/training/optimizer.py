"""megatron-core's optimizer with the GPAS gates in their own group and the reference clipping.

Step order (spec §2): global-norm clip over all parameters (gates included), *then* a joint-norm
clip of the gates alone (``torch.nn.utils.clip_grad_norm_`` semantics:
factor = min(1, max_norm / (norm + 1e-6))), then the update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import param_is_not_shared

from megatron_ext.config import RunConfig
from megatron_ext.layers.transformer_layer import is_gpas_gate
from megatron_ext.platform.collectives import collective_device
from megatron_ext.training.grad_norm import use_foreach_l2_norm


@dataclass
class StepResult:
    success: bool
    grad_norm: Optional[float]
    gate_grad_norm: Optional[float]
    rejected: bool = False  # finite, but refused by the caller's gate (a spike)


def build_optimizer(
    model_chunks,
    config: OptimizerConfig,
    *,
    fused_adam: bool = False,
    foreach_grad_norm: bool = True,
):
    """get_megatron_optimizer with megatron-core's standard groups.

    ``fused_adam``: torch's fused Adam kernel (one launch for all parameters; CUDA and CPU)
    instead of its per-tensor-list ``foreach`` implementation, where megatron-core falls back to
    torch's optimizers (no TE/Apex). ``foreach_grad_norm``: gradient norms for clipping without a
    host sync per parameter (:mod:`megatron_ext.training.grad_norm`).

    The gates (shape [1]) fall under the standard no-weight-decay rule. They are deliberately
    not given a group of their own: megatron-core 0.16.1 matches saved and current param groups
    by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) only, so a second no-decay group
    could not be told apart on checkpoint load. Gate clipping finds the gates' main parameters
    through the optimizer's model→main parameter mapping instead (:func:`gate_main_params`).
    """
    use_foreach_l2_norm(foreach_grad_norm)
    with _torch_adam_fused(fused_adam):
        optimizer = get_megatron_optimizer(config, model_chunks)
    for sub in _sub_optimizers(optimizer):
        if hasattr(sub, "get_parameter_state_dp_zero"):
            _keep_bucket_padding_in_dp_zero_state(sub)
    return optimizer


def build_run_optimizer(cfg: RunConfig, model, params_dtype: torch.dtype):
    """(optimizer, LR scheduler) of a run: Adam with the run's hyper-parameters (clipping is
    :func:`optimizer_step`'s), linear warmup then ``--lr-decay-style``, constant weight decay."""
    o = cfg.optim
    optimizer = build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.resolved_min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            bf16=o.bf16,
            params_dtype=params_dtype,
            clip_grad=0.0,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        fused_adam=cfg.device == "cuda" if o.use_fused_adam is None else o.use_fused_adam,
        foreach_grad_norm=o.foreach_grad_norm,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.resolved_min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.resolved_decay_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


@contextlib.contextmanager
def _torch_adam_fused(enabled: bool):
    """While megatron-core builds its optimizer, torch's Adam/AdamW come with ``fused=True``."""
    if not enabled:
        yield
        return
    originals = torch.optim.Adam, torch.optim.AdamW

    def fused(cls):
        return type(cls.__name__, (cls,), {"__init__": _fused_init(cls)})

    torch.optim.Adam, torch.optim.AdamW = fused(torch.optim.Adam), fused(torch.optim.AdamW)
    try:
        yield
    finally:
        torch.optim.Adam, torch.optim.AdamW = originals


def _fused_init(cls):
    def __init__(self, params, **kwargs):
        cls.__init__(self, params, fused=True, **kwargs)

    return __init__


def _keep_bucket_padding_in_dp_zero_state(dist_optimizer) -> None:
    """Work around a megatron-core 0.16.1 bug in the distributed optimizer's checkpoints.

    ``get_parameter_state_dp_zero`` lays the buckets' states end to end without the padding
    at the end of each bucket, but ``sharded_param_state_fully_reshardable`` (the format our
    checkpoints use) cuts parameters out of that tensor at their offsets in the *padded*
    buffer. With one bucket (no --overlap-grad-reduce) the two agree; with several, every
    parameter after the first bucket is saved shifted, i.e. corrupted. Putting the padding back
    makes the offsets agree (loading reads per-parameter tensors and is unaffected).
    """
    unpatched = dist_optimizer.get_parameter_state_dp_zero

    def with_bucket_padding(*args, **kwargs):
        state = unpatched(*args, **kwargs)
        if state is None:
            return None
        for gbuf_idx, per_dtype in state.items():
            if not isinstance(gbuf_idx, int):  # e.g. "buckets_coalesced"
                continue
            buffer = dist_optimizer.buffers[gbuf_idx]
            for world_tensors in per_dtype.values():
                for key, tensor in world_tensors.items():
                    if torch.is_tensor(tensor) and tensor.numel() == buffer.numel_unpadded:
                        world_tensors[key] = _padded_like_buffer(tensor, buffer)
        return state

    dist_optimizer.get_parameter_state_dp_zero = with_bucket_padding


def _padded_like_buffer(unpadded: torch.Tensor, buffer) -> torch.Tensor:
    """Each bucket's slice of ``unpadded`` placed at the bucket's offset in the padded buffer."""
    out = unpadded.new_zeros(buffer.numel)
    start = 0
    for bucket in buffer.buckets:
        n = bucket.numel_unpadded
        out[bucket.offset : bucket.offset + n] = unpadded[start : start + n]
        start += n
    return out


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _flat(groups) -> list:
    return [p for group in groups for p in group]


def _model_to_main_pairs(sub) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(model parameter, the optimizer's main parameter or shard of it) on this rank."""
    if hasattr(sub, "shard_fp32_from_float16_groups"):  # distributed optimizer
        return list(
            zip(
                _flat(sub.model_float16_groups),
                _flat(sub.shard_fp32_from_float16_groups),
                strict=True,
            )
        ) + list(zip(_flat(sub.model_fp32_groups), _flat(sub.shard_fp32_groups), strict=True))
    if hasattr(sub, "fp32_from_float16_groups"):  # bf16/fp16 params with fp32 main params
        return list(
            zip(_flat(sub.float16_groups), _flat(sub.fp32_from_float16_groups), strict=True)
        ) + [(p, p) for p in _flat(sub.fp32_from_fp32_groups)]
    return [(p, p) for group in sub.optimizer.param_groups for p in group["params"]]


def _drop_grads(optimizer, frozen: set) -> None:
    """No gradient for the main parameters (or shards) of the model parameters in ``frozen``."""
    for sub in _sub_optimizers(optimizer):
        for model, main in _model_to_main_pairs(sub):
            if model in frozen:
                main.grad = None


def _adam_states(optimizer) -> list[dict]:
    return [st for sub in _sub_optimizers(optimizer) for st in sub.optimizer.state.values()]


@contextlib.contextmanager
def common_adam_step(optimizer):
    """megatron-core saves one Adam step for all parameters, but those LISA left out have taken
    fewer: save under the largest (the step of the parameters that always train), then put
    each parameter's own back. A resume restores them with :func:`set_adam_steps`."""
    states = [st for st in _adam_states(optimizer) if "step" in st]
    own = [st["step"] for st in states]
    if own:
        top = max(own, key=float)
        for st in states:
            st["step"] = top.clone() if torch.is_tensor(top) else top
    try:
        yield
    finally:
        for st, step in zip(states, own, strict=True):
            st["step"] = step


def init_adam_state(optimizer) -> None:
    """Create every parameter's Adam state (step 0, zero moments) now, as torch's Adam would at
    its first update: a layer LISA has not sampled yet still has a state to checkpoint."""
    from torch.optim.optimizer import _get_scalar_dtype

    for sub in _sub_optimizers(optimizer):
        inner = sub.optimizer
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if inner.state.get(p):
                    continue
                inner.state[p] = {
                    "step": torch.zeros(
                        (), dtype=_get_scalar_dtype(), device=p.device if on_device else "cpu"
                    ),  # fmt: skip
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def set_adam_steps(optimizer, behind: dict) -> None:
    """Set the Adam step of each model parameter in ``behind`` to the common step minus its
    value (updates it sat out), after a checkpoint load gave every parameter the common one."""
    for sub in _sub_optimizers(optimizer):
        for model, main in _model_to_main_pairs(sub):
            missed = behind.get(model, 0)
            st = sub.optimizer.state.get(main)
            if missed and st is not None and "step" in st:
                step = st["step"]
                st["step"] = step - missed if torch.is_tensor(step) else step - missed


def gate_main_params(optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's main parameters (or shards) of the GPAS gates held by this rank."""
    return [
        main
        for sub in _sub_optimizers(optimizer)
        for model, main in _model_to_main_pairs(sub)
        if is_gpas_gate(model)
    ]


def _clip_gate_grads(optimizer, max_norm: float) -> float:
    """Joint-norm clip of all gates across every rank; returns the norm before clipping."""
    params = gate_main_params(optimizer)
    counted = [
        p.grad
        for p in params
        if p.grad is not None
        and param_is_not_shared(p)
        and tensor_parallel.param_is_not_tensor_parallel_duplicate(p)
    ]
    sq = torch.zeros(1, dtype=torch.float32, device=_device_of(params))
    for g in counted:
        sq += g.detach().float().pow(2).sum()
    group = _sub_optimizers(optimizer)[0].get_grad_stats_parallel_group()
    torch.distributed.all_reduce(sq, group=group)
    norm = sq.sqrt().item()
    coeff = max_norm / (norm + 1e-6)
    if coeff < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coeff)
    return norm


def _device_of(params: Iterable[torch.Tensor]) -> torch.device:
    for p in params:
        return p.device
    return collective_device()


@torch.no_grad()
def optimizer_step(
    optimizer,
    clip_grad: float = 0.0,
    clip_gate_grad: float = 0.0,
    accept: Optional[Callable[[float], bool]] = None,
    frozen: Optional[set] = None,
) -> StepResult:
    """One update: prepare grads, global clip, gate clip, step. Skips the update on inf/NaN,
    and when ``accept`` (given the global grad norm, before clipping) says no. Model parameters
    in ``frozen`` (LISA's inactive layers) lose their gradients first: the norm leaves them out
    and the step skips them, Adam moments included.

    The megatron optimizer must be built with ``clip_grad=0`` so that clipping happens here, in
    the reference's order.
    """
    if optimizer.prepare_grads():
        return StepResult(False, None, None)
    if frozen:
        _drop_grads(optimizer, frozen)
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        # NaN/Inf gradients: skip the update (the caller counts and may stop the run).
        return StepResult(False, float(grad_norm), None)
    if accept is not None and not accept(float(grad_norm)):
        return StepResult(False, float(grad_norm), None, rejected=True)
    if clip_grad > 0.0:
        for sub in _sub_optimizers(optimizer):
            params = sub.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm)
    gate_norm = _clip_gate_grads(optimizer, clip_gate_grad) if clip_gate_grad > 0.0 else None
    success = optimizer.step_with_ready_grads()
    return StepResult(bool(success), float(grad_norm), gate_norm)
