"""Fused kernels change speed, not results: the same model with megatron-core's fused SwiGLU
and bias-dropout-add (torch.compile'd, as on GPU) gives the unfused loss and gradients, and the
fused functions really ran."""

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


def _count_calls(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


# pre, deeppost: the residual add goes through megatron-core's bias-dropout-add (deeppost with
# α on the shortcut, then the post-add norm). GPAS types fold their add into the GPAS op, so
# for them only the SwiGLU fusion applies.
@pytest.mark.parametrize(
    "norm_type,fused_adds",
    [("pre", 8), ("deeppost", 8), ("pre_gpas", 0), ("deeppost_gpas", 0)],
)
def test_fused_swiglu_and_residual_add_match_unfused(monkeypatch, norm_type, fused_adds):
    from megatron.core.fusions import fused_bias_dropout
    from megatron.core.transformer import mlp

    loss, grads = _loss_and_grads(norm_type)
    calls: dict = {}
    _count_calls(monkeypatch, fused_bias_dropout, "bias_dropout_add_fused_train", calls)
    _count_calls(monkeypatch, mlp, "bias_swiglu_impl", calls)
    fused_loss, fused_grads = _loss_and_grads(
        norm_type, bias_activation_fusion=True, bias_dropout_fusion=True
    )
    # 4 layers: one fused SwiGLU each, two residual adds each where they are not GPAS's
    assert calls.get("bias_swiglu_impl") == 4
    assert calls.get("bias_dropout_add_fused_train", 0) == fused_adds
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
