"""Fused kernels change speed, not results: the same model with megatron-core's fused SwiGLU
and bias-dropout-add (torch.compile'd, as on GPU) gives the unfused loss and gradients."""

import pytest
import torch

from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.presets import model_preset

SEQ, BATCH = 32, 2

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def _loss_and_grads(norm_type, **fusions):
    cfg = model_preset("tiny4", norm_type=norm_type, seq_length=SEQ)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu=True, **fusions), seed=3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# pre_gpas: GPAS after the fused add; deeppost_gpas: GPAS and α on the shortcut, then the
# fused add, then the post-add norm.
@pytest.mark.parametrize("norm_type", ["pre_gpas", "deeppost_gpas"])
def test_fused_swiglu_and_residual_add_match_unfused(norm_type):
    loss, grads = _loss_and_grads(norm_type)
    fused_loss, fused_grads = _loss_and_grads(
        norm_type, bias_activation_fusion=True, bias_dropout_fusion=True
    )
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
