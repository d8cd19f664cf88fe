"""Clipping follows the reference (spec §2): global-norm clip over all parameters, then a joint
clip of the gates, with torch.nn.utils.clip_grad_norm_ semantics."""

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.presets import model_preset
from megatron_ext.training.model_setup import wrap_model
from megatron_ext.training.optimizer import build_optimizer, optimizer_step
from megatron_ext.training.step import forward_step
from tests.helpers.dist_workers import micro_batches, synthetic_batches

LR = 0.5


@pytest.mark.parametrize(
    "clip_grad,clip_gate", [(0.0, 0.0), (1.0, 0.0), (0.0, 1e-4), (0.05, 1e-3), (1e3, 1e3)]
)
def test_update_equals_reference_clipping(megatron_cpu, clip_grad, clip_gate):
    cfg = model_preset("tiny4", norm_type="pre_gpas")
    tc = build_transformer_config(cfg, use_cpu=True)
    model = build_model(cfg, tc)
    with torch.no_grad():  # gates away from 0 so their gradients are not tiny
        for i, p in enumerate(p for n, p in model.named_parameters() if "gpas" in n):
            p.fill_(0.3 * (i + 1))
    wrapped = wrap_model([model], tc)
    opt = build_optimizer(
        wrapped,
        OptimizerConfig(optimizer="sgd", sgd_momentum=0.0, lr=LR, weight_decay=0.0, clip_grad=0.0),
    )
    for sub in opt.chained_optimizers:
        for group in sub.optimizer.param_groups:
            group["lr"] = LR

    batch = micro_batches(synthetic_batches(2, 1, 1, 32, 512)[0], 0, 1, 1)[0]
    wrapped[0].zero_grad_buffer()
    output, loss_fn = forward_step(iter([batch]), wrapped[0])
    loss_sum, count, _ = loss_fn(output)
    (loss_sum / count).backward()
    wrapped[0].finish_grad_sync()

    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}

    # Reference: plain tensors, torch's own clip_grad_norm_, in the reference order.
    ref = {n: torch.nn.Parameter(before[n].clone()) for n in names}
    for n in names:
        ref[n].grad = grads[n].clone()
    total = torch.nn.utils.clip_grad_norm_(list(ref.values()), clip_grad or float("inf"))
    if clip_gate:
        torch.nn.utils.clip_grad_norm_(
            [ref[n] for n in names if n.endswith("gpas_gate")], clip_gate
        )
    expected = {n: ref[n] - LR * ref[n].grad for n in names}

    result = optimizer_step(opt, clip_grad=clip_grad, clip_gate_grad=clip_gate)
    assert result.success
    assert result.grad_norm == pytest.approx(total.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[n].detach(), rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}"
        )
    if clip_gate:
        gate_delta = torch.stack(
            [
                (before[n] - model.get_parameter(n).detach()).squeeze()
                for n in names
                if n.endswith("gpas_gate")
            ]
        )
        # The joint gate step is at most lr·clip (1% slack: fp32 resolution of a 1e-5 step
        # taken on O(1) parameters).
        assert gate_delta.norm().item() <= LR * clip_gate * 1.01
