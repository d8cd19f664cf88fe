"""Activation recomputation (--recompute-granularity full | selective) re-runs the forward in
backward and must leave the loss and every gradient (GPAS gates included) unchanged."""

import pytest
import torch

from megatron_ext.variants import NORM_TYPE_NAMES

FULL_UNIFORM = dict(
    recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
)
FULL_BLOCK = dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
SELECTIVE = dict(recompute_granularity="selective")


def _loss_and_grads(norm_type, recompute):
    from megatron_ext.models.gpt import build_model, build_transformer_config
    from megatron_ext.models.presets import model_preset

    cfg = model_preset("tiny4", norm_type=norm_type)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu=True, **recompute), seed=3)
    with torch.no_grad():  # gates away from 0 so that their gradients are not trivial
        for name, p in model.named_parameters():
            if name.endswith("gpas_gate"):
                p.fill_(0.5)
    calls = {"layer0": 0, "core_attention0": 0}
    layer0 = model.decoder.layers[0]
    layer0.register_forward_hook(lambda *_: calls.__setitem__("layer0", calls["layer0"] + 1))
    layer0.self_attention.core_attention.register_forward_hook(
        lambda *_: calls.__setitem__("core_attention0", calls["core_attention0"] + 1)
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=gen)
    positions = torch.arange(cfg.seq_length).expand(2, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, calls


@pytest.mark.parametrize(
    "norm_type,recompute,recomputed",
    [(nt, FULL_UNIFORM, "layer0") for nt in NORM_TYPE_NAMES]
    + [(nt, SELECTIVE, "core_attention0") for nt in NORM_TYPE_NAMES]
    + [(nt, FULL_BLOCK, "layer0") for nt in ("pre_gpas", "post_pre_gpas")],
)
def test_recompute_leaves_loss_and_gradients_unchanged(
    megatron_cpu, norm_type, recompute, recomputed
):
    loss, grads, calls = _loss_and_grads(norm_type, {})
    loss_rc, grads_rc, calls_rc = _loss_and_grads(norm_type, recompute)
    assert calls == {"layer0": 1, "core_attention0": 1}
    assert calls_rc[recomputed] == 2, calls_rc  # the forward really ran again in backward
    assert loss_rc == loss
    for name, g in grads.items():
        assert torch.equal(grads_rc[name], g), name
