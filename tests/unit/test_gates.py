"""GPAS gates as parameters: identifiable names, tags for TP/SP/optimizer, freezing."""

import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_ext.models.gates import freeze_gates, gate_layers, gate_values
from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.presets import model_preset
from megatron_ext.training.model_setup import wrap_model
from megatron_ext.training.optimizer import build_optimizer, gate_main_params
from tests.helpers.dist_workers import micro_batches, synthetic_batches


def _model(norm_type="pre_gpas", **kw):
    cfg = model_preset("tiny4", norm_type=norm_type)
    tc = build_transformer_config(cfg, use_cpu=True, **kw)
    return cfg, tc, build_model(cfg, tc)


def test_gate_names_and_tags(megatron_cpu):
    _, _, model = _model()
    names = [n for n, p in model.named_parameters() if "gpas" in n]
    assert names == [f"decoder.layers.{i}.gpas_gate" for i in range(4)]
    for _, gate in gate_layers(model):
        assert gate.shape == (1,)
        assert gate.is_gpas_gate
        assert not getattr(gate, "tensor_model_parallel", False)  # replicated under TP
        assert gate.sequence_parallel is False


def test_gates_marked_for_sequence_parallel_reduction(megatron_cpu):
    cfg = model_preset("tiny4", norm_type="sandwich_gpas")
    from megatron_ext.config import ParallelConfig

    # Only the flags are read here; the modules are built on this single process.
    tc = build_transformer_config(
        cfg, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), use_cpu=True
    )
    model = build_model(cfg, tc)
    assert all(g.sequence_parallel for _, g in gate_layers(model))
    norms = [p for n, p in model.named_parameters() if "layernorm" in n]
    assert norms and all(p.sequence_parallel for p in norms)


def test_gates_have_no_weight_decay_and_are_found_in_the_optimizer(megatron_cpu):
    _, tc, model = _model()
    wrapped = wrap_model([model], tc)
    opt = build_optimizer(
        wrapped, OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=0.0)
    )
    groups = [g for sub in opt.chained_optimizers for g in sub.optimizer.param_groups]
    gates = gate_main_params(opt)
    assert len(gates) == 4
    for gate in gates:
        group = next(g for g in groups if any(p is gate for p in g["params"]))
        assert group["wd_mult"] == 0.0
    matrices = [g for g in groups if g["wd_mult"] == 1.0]
    assert matrices and all(p.dim() == 2 for g in matrices for p in g["params"])


def _one_step(model, tc, clip_gate_grad=0.0):
    wrapped = wrap_model([model], tc)
    opt = build_optimizer(
        wrapped, OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0)
    )
    from megatron_ext.training.step import train_step

    batch = synthetic_batches(1, 1, 2, 32, 512)[0]
    return train_step(
        [iter(micro_batches(batch, 0, 1, 1))],
        wrapped,
        opt,
        num_microbatches=2,
        seq_length=32,
        micro_batch_size=1,
        clip_gate_grad=clip_gate_grad,
    )


def test_frozen_gates_stay_frozen(megatron_cpu):
    _, tc, model = _model()
    assert freeze_gates(model) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, tc)
    after = dict(model.named_parameters())
    assert all(after[f"decoder.layers.{i}.gpas_gate"].item() == 0.0 for i in range(4))
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in moved


def test_gates_train_and_report_scale(megatron_cpu):
    _, tc, model = _model()
    _one_step(model, tc)
    values = gate_values(model)
    assert sorted(values) == [0, 1, 2, 3]
    for v in values.values():
        assert v["gate"] != 0.0
        g = torch.tensor(v["gate"])
        assert abs(v["scale"] - (1 - torch.nn.functional.silu(g)).item()) < 1e-6
