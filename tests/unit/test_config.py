"""Bad configurations fail before any model is built, naming the flag to change."""

import re

import pytest

from megatron_ext.config import ConfigError, ModelConfig, ParallelConfig
from megatron_ext.models.presets import model_preset


def test_unknown_norm_type():
    with pytest.raises(ConfigError, match=r"--norm-type: unknown norm type 'preln'"):
        ModelConfig(norm_type="preln").validate()


@pytest.mark.parametrize("post_num", [-1, 13])
def test_post_num_out_of_range(post_num):
    with pytest.raises(ConfigError, match=r"--post-num: must be in \[0, 12\]"):
        model_preset("71m", norm_type="post_pre", post_num=post_num).validate()


def test_post_num_given_to_non_mix_type():
    with pytest.raises(ConfigError, match=r"--post-num: only applies to the Mix-LN types"):
        model_preset("71m", norm_type="pre_gpas", post_num=3).validate()


def test_post_num_default_is_quarter_depth():
    assert model_preset("71m", norm_type="post_pre").resolved_post_num == 3
    assert model_preset("1b", norm_type="post_pre_gpas").resolved_post_num == 6
    assert model_preset("7b", norm_type="post_pre").resolved_post_num == 8
    assert model_preset("7b", norm_type="pre").resolved_post_num is None


def test_layers_not_divisible_by_pipeline_size():
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size: 12 layers"):
        ParallelConfig(pipeline_model_parallel_size=5).validate(model_preset("71m"))


def test_heads_not_divisible_by_tensor_size():
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size: 8 attention heads"):
        ParallelConfig(tensor_model_parallel_size=3).validate(model_preset("71m"))


def test_virtual_pipeline_chunks():
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage"):
        ParallelConfig(
            pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=4
        ).validate(model_preset("71m"))
    ok = ParallelConfig(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2)
    assert ok.validate(model_preset("71m")).virtual_pipeline_model_parallel_size(12) == 3


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ConfigError, match="--sequence-parallel"):
        ParallelConfig(sequence_parallel=True).validate(model_preset("71m"))


def test_unknown_lns_mode():
    with pytest.raises(ConfigError, match="--lns-mode"):
        model_preset("71m", norm_type="lns", lns_mode="learned").validate()


def test_world_size_must_hold_the_model():
    with pytest.raises(ConfigError, match="world size 3"):
        ParallelConfig(tensor_model_parallel_size=2).validate(model_preset("71m"), world_size=3)


def test_errors_raise_before_building(monkeypatch):
    """build_transformer_config validates first: no megatron object is created on bad input."""
    import megatron_ext.models.gpt as gpt

    def boom(**kwargs):
        raise AssertionError("TransformerConfig was built for an invalid configuration")

    monkeypatch.setattr(gpt, "TransformerConfig", boom)
    with pytest.raises(ConfigError, match="--norm-type"):
        gpt.build_transformer_config(ModelConfig(norm_type="nope"))


def test_bucket_size_needs_overlap_and_must_be_positive():
    model = model_preset("71m")
    with pytest.raises(ConfigError, match=r"--ddp-bucket-size: only applies with --overlap-grad"):
        ParallelConfig(ddp_bucket_size=1000).validate(model)
    with pytest.raises(ConfigError, match=r"--ddp-bucket-size: must be a positive number"):
        ParallelConfig(overlap_grad_reduce=True, ddp_bucket_size=0).validate(model)
    ParallelConfig(overlap_grad_reduce=True, ddp_bucket_size=1000).validate(model)


def test_param_gather_overlap_needs_the_distributed_optimizer_and_grad_overlap():
    model = model_preset("71m")
    for layout in (
        dict(overlap_param_gather=True, overlap_grad_reduce=True),
        dict(overlap_param_gather=True, use_distributed_optimizer=True),
    ):
        with pytest.raises(ConfigError, match=r"--overlap-param-gather: needs --use-distributed"):
            ParallelConfig(**layout).validate(model)


@pytest.mark.usefixtures("megatron_cpu")
def test_gate_init_and_scaled_output_init_reach_the_built_model():
    """--gate-init sets every GPAS gate; --scaled-output-init divides the output projections'
    σ (attention o and MLP down) by √(2L), leaving the input projections alone."""
    import torch

    from megatron_ext.models.gpt import build_model, build_transformer_config
    from megatron_ext.planning.arguments import parse_run_config

    base = "--model-size tiny4 --norm-type pre_gpas --mock-data --vocab-size 512".split()
    base += "--micro-batch-size 1 --global-batch-size 1 --train-iters 1".split()

    def built(*flags):
        cfg = parse_run_config(base + list(flags)).model
        return cfg, build_model(cfg, build_transformer_config(cfg, use_cpu=True), seed=5)

    cfg, plain = built()
    _, scaled = built("--gate-init", "0.25", "--scaled-output-init")
    gates = [p for n, p in scaled.named_parameters() if n.endswith("gpas_gate")]
    assert len(gates) == cfg.num_layers and all(torch.all(g == 0.25) for g in gates)
    assert all(torch.all(p == 0) for n, p in plain.named_parameters() if n.endswith("gpas_gate"))

    def std(model, suffix):
        return torch.cat(
            [p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)]
        ).std()

    shrink = 1 / (2 * cfg.num_layers) ** 0.5
    for out in ("linear_proj.weight", "linear_fc2.weight"):
        assert std(scaled, out) / std(plain, out) == pytest.approx(shrink, rel=0.05), out
    for inp in ("linear_qkv.weight", "linear_fc1.weight"):
        assert std(scaled, inp) / std(plain, inp) == pytest.approx(1.0, rel=0.05), inp


def test_every_choice_field_refuses_an_unknown_value_naming_its_flag():
    """Generated from the config sections: a Literal field's bad value, from the command line or
    a YAML file, fails validation with its flag and the accepted values."""
    import dataclasses
    import typing

    from megatron_ext.config import RunConfig, choices_of
    from megatron_ext.planning.arguments import SECTIONS, TOP_LEVEL, parse_run_config

    fields = [(cls, f) for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    fields += [(RunConfig, f) for f in dataclasses.fields(RunConfig) if f.name in TOP_LEVEL]
    checked = []
    for cls, f in fields:
        choices = choices_of(typing.get_type_hints(cls)[f.name])
        if choices is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        cfg = parse_run_config(["--mock-data", "--device", "cpu", flag, "no-such-value"])
        accepted = re.escape(", ".join(map(str, choices)))
        with pytest.raises(ConfigError, match=rf"^{flag}: .*choose one of {accepted}$"):
            cfg.validate(1)
        checked.append(f.name)
    assert {"norm_type", "data_mode", "lr_decay_style", "fp8_recipe", "device",
            "on_damaged_checkpoint"} <= set(checked)  # fmt: skip


def test_flag_types_come_from_the_fields():
    from megatron_ext.planning.arguments import parse_run_config

    cfg = parse_run_config(
        [
            "--lr",
            "3e-4",
            "--profile-ranks",
            "0",
            "3",
            "--data-path",
            "0.3",
            "a",
            "0.7",
            "b",
            "--no-foreach-grad-norm",
            "--eval-tokens",
            "1000",
        ]  # fmt: skip
    )
    assert cfg.optim.lr == 3e-4 and cfg.profiling.profile_ranks == [0, 3]
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"] and cfg.optim.foreach_grad_norm is False
    assert cfg.eval.eval_tokens == 1000 and isinstance(cfg.eval.eval_tokens, int)


def test_attention_backend_choices_are_megatron_cores():
    """The configuration spells the backend names to stay torch-free; they must be the enum's."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_ext.config.run import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS == tuple(b.name for b in AttnBackend)


def test_lisa_refuses_overlapped_parameter_gathers():
    from megatron_ext.planning.arguments import parse_run_config

    base = ["--mock-data", "--device", "cpu", "--num-layers", "4", "--hidden-size", "64",
            "--num-attention-heads", "4", "--lisa-layers", "2"]  # fmt: skip
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    with pytest.raises(ConfigError, match=r"^--overlap-param-gather: is not supported with LISA"):
        parse_run_config(base + flags).validate(4)
    parse_run_config(base[:-2] + flags).validate(4)  # without LISA it is fine
