"""The no-Transformer-Engine fast path computes what megatron-core's local path computes:
SDPA core attention (``--attention-backend auto``) against megatron-core's DotProductAttention
(``local``), the device-side gradient norm against megatron-core's per-parameter fallback, and
torch's fused Adam against its default implementation."""

import pytest
import torch

from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.presets import model_preset
from megatron_ext.variants import NORM_TYPE_NAMES

pytestmark = pytest.mark.usefixtures("megatron_cpu")
SEQ, BATCH = 32, 2


def _loss_and_grads(norm_type, attention_backend, **model_kw):
    from megatron.core.transformer.enums import AttnBackend

    cfg = model_preset("tiny4", norm_type=norm_type, seq_length=SEQ, **model_kw)
    tc = build_transformer_config(
        cfg, use_cpu=True, attention_backend=AttnBackend[attention_backend]
    )
    model = build_model(cfg, tc, seed=3)
    with torch.no_grad():  # gates away from 0: every gate path is exercised
        for name, p in model.named_parameters():
            if name.endswith("gpas_gate"):
                p.fill_(0.4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    core = type(model.decoder.layers[0].self_attention.core_attention).__name__
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, core


@pytest.mark.parametrize("norm_type", NORM_TYPE_NAMES)
def test_sdpa_attention_matches_megatron_local_attention(norm_type):
    loss, grads, core = _loss_and_grads(norm_type, "local")
    sdpa_loss, sdpa_grads, _ = _loss_and_grads(norm_type, "auto")
    assert core == "LocalCoreAttention"
    assert sdpa_loss == pytest.approx(loss, rel=1e-6)
    _assert_grads_close(sdpa_grads, grads)


def _assert_grads_close(got, want, rel=1e-5, gate_rel=2e-4):
    """Every gradient within ``rel`` of the other in norm (fp32 rounding of another kernel).

    A gate gradient is one sum over a whole activation with cancellation: its fp32 rounding
    noise, measured against float64 by the parity suite (``fp32_gradient_error``), reaches
    1.4e-4 on these tiny models, hence its own bound."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = ((got[name] - g).norm() / g.norm()).item()
        bound = gate_rel if name.endswith("gpas_gate") else rel
        assert err <= bound, f"{name}: rel {err:.2e}"


def test_sdpa_attention_with_grouped_query_attention():
    loss, grads, _ = _loss_and_grads("pre_gpas", "local", num_query_groups=2)
    sdpa_loss, sdpa_grads, _ = _loss_and_grads("pre_gpas", "auto", num_query_groups=2)
    assert sdpa_loss == pytest.approx(loss, rel=1e-6)
    _assert_grads_close(sdpa_grads, grads)


def test_sdpa_path_really_calls_sdpa(monkeypatch):
    import torch.nn.functional as F

    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    _loss_and_grads("pre", "auto")
    assert len(calls) == 4  # one per layer
    calls.clear()
    _loss_and_grads("pre", "local")
    assert calls == []


def test_foreach_grad_norm_is_the_per_parameter_norm_bit_for_bit():
    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_ext.training.grad_norm import foreach_l2_norm

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen) * s for n, s in ((7, 1e-3), (1000, 1.0), (1, 50.0))]
    want, _ = local_multi_tensor_l2_norm(65536, None, [tensors], False)
    got, _ = foreach_l2_norm(65536, None, [tensors], False)
    assert torch.equal(got, want)
    manual = torch.cat([t.double() for t in tensors]).norm().float()
    assert got.item() == pytest.approx(manual.item(), rel=1e-6)


def test_foreach_grad_norm_is_installed_and_used_by_clipping():
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_ext.training.grad_norm import foreach_l2_norm, use_foreach_l2_norm

    try:
        assert use_foreach_l2_norm(True)
        assert clip_grads.l2_norm_impl is foreach_l2_norm
        grads = [torch.full((4,), 3.0), torch.full((9,), 4.0)]
        assert clip_grads.get_grad_norm_fp32(grads) == pytest.approx((36 + 144) ** 0.5)
        assert use_foreach_l2_norm(False)
        assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm
    finally:
        use_foreach_l2_norm(True)


def test_fused_adam_matches_torch_default_adam():
    from megatron.core.optimizer import OptimizerConfig

    from megatron_ext.models.gpt import unwrap_model
    from megatron_ext.training.model_setup import wrap_model
    from megatron_ext.training.optimizer import build_optimizer
    from megatron_ext.training.step import train_step
    from tests.helpers.dist_workers import micro_batches, synthetic_batches

    def train(fused):
        cfg = model_preset("tiny", norm_type="pre_gpas")
        tc = build_transformer_config(cfg, use_cpu=True)
        model = wrap_model([build_model(cfg, tc, seed=1)], tc)
        opt = build_optimizer(
            model,
            OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, weight_decay=0.0),
            fused_adam=fused,
        )
        inner = opt.optimizer if hasattr(opt, "optimizer") else opt.chained_optimizers[0].optimizer
        assert inner.defaults.get("fused") is (True if fused else None)
        batch = synthetic_batches(1, 1, 2, cfg.seq_length, cfg.vocab_size)[0]
        for _ in range(3):
            train_step(
                [iter(micro_batches(batch, 0, 1, 1))],
                model,
                opt,
                num_microbatches=2,
                seq_length=cfg.seq_length,
                micro_batch_size=1,
                clip_grad=1.0,
                clip_gate_grad=0.01,
            )
        return {n: p.detach().clone() for n, p in unwrap_model(model[0]).named_parameters()}

    default, fused = train(False), train(True)
    for name, p in default.items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-6, msg=name)
