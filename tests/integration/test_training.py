"""pretrain_gpas.py end to end on CPU: exact resume (also with PP=2 and the distributed
optimizer and async saves), resume under another layout, SIGTERM, the LR schedule,
non-finite steps, the metrics file and configuration errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ext.resilience import exit_codes
from tests.helpers import ROOT
from tests.helpers.cli_runs import STEP_KEYS, base_args, losses, spawn, step_metrics
from tests.helpers.dist_workers import run_cli, run_ranks

pytestmark = pytest.mark.slow


def _run(tmp_path, argv, world=1):
    codes = run_ranks(run_cli, world, (argv,), tmp_path)
    assert codes == [0] * world
    return codes


SP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
VPP2 = {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}


@pytest.mark.parametrize(
    "layout,world",
    [
        ({}, 1),
        ({"pipeline_model_parallel_size": 2}, 2),
        (VPP2, 2),
        (SP2, 2),
        (
            {
                "use_distributed_optimizer": True,
                "overlap_grad_reduce": True,
                "overlap_param_gather": True,
                "ddp_bucket_size": 20000,
            },
            2,
        ),
        # checkpoints written in the background, finalized across both ranks
        ({"use_distributed_optimizer": True, "async_save": True, "save_interval": 2}, 2),
    ],
    ids=[
        "single",
        "pp2",
        "vpp2",
        "tp2_sp",
        "dp2_distopt_overlap",
        "dp2_distopt_async_save",
    ],
)
def test_resume_is_exact(tmp_path, layout, world):
    straight = str(tmp_path / "straight")
    _run(tmp_path, base_args(straight, **layout), world)
    split = str(tmp_path / "split")
    _run(tmp_path, base_args(split, exit_interval=3, **layout), world)
    assert open(os.path.join(split, "latest_checkpointed_iteration.txt")).read() == "3"
    _run(tmp_path, base_args(split, **layout), world)
    a = step_metrics(os.path.join(straight, "metrics.jsonl"))
    b = step_metrics(os.path.join(split, "metrics.jsonl"))
    assert sorted(a["lm_loss"]) == sorted(b["lm_loss"]) == list(range(1, 7))
    assert a == b  # bit-identical per-step losses and gradient norms, fp32
    assert a["lm_loss"][6] < a["lm_loss"][1]
    assert all(v > 0 for v in a["gate_grad_norm"].values())


# Resumed under another layout: 3 iterations, then 5 more. Adam ε 1e-6 keeps fp32 rounding of
# near-zero gradient entries from being amplified by lr/ε (see tests/helpers/dist_workers.py).
MOVES = {
    "tp1_to_tp2_sp": (({}, 1), (SP2, 2)),
    "tp2_sp_to_tp1": ((SP2, 2), ({}, 1)),
    "tp2_sp_to_tp2": ((SP2, 2), ({"tensor_model_parallel_size": 2}, 2)),
    "tp2_to_tp2_sp": (({"tensor_model_parallel_size": 2}, 2), (SP2, 2)),
    "pp1_to_vpp2": (({}, 1), (VPP2, 2)),
    # the distributed optimizer's state resharded from 2 data-parallel ranks to 1 and back
    "dp2_distopt_to_dp1": (
        ({"use_distributed_optimizer": True}, 2),
        ({"use_distributed_optimizer": True}, 1),
    ),
    "dp1_distopt_to_dp2": (
        ({"use_distributed_optimizer": True}, 1),
        ({"use_distributed_optimizer": True}, 2),
    ),
    # all three dimensions (8 ranks) to two: TP 2 + SP × PP 2 × DP 2 with the distributed
    # optimizer, resumed as TP 2 + SP × DP 2 (4 ranks); it also moves PP 2 to 1
    "tp2_pp2_dp2_distopt_to_tp2_dp2": (
        ({**SP2, "pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}, 8),
        ({**SP2, "use_distributed_optimizer": True}, 4),
    ),
}


MOVE_ITERS, MOVE_EXTRA = 8, {"adam_eps": 1e-6}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The one-process run every move is compared with (the same for all of them)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    _run(tmp_path, base_args(str(tmp_path / "run"), iters=MOVE_ITERS, **MOVE_EXTRA))
    return step_metrics(str(tmp_path / "run" / "metrics.jsonl"))


@pytest.mark.parametrize("move", list(MOVES))
def test_resume_under_another_layout(tmp_path, move, straight_run):
    (before, world_before), (after, world_after) = MOVES[move]
    iters, extra = MOVE_ITERS, MOVE_EXTRA
    moved = str(tmp_path / "moved")
    _run(tmp_path, base_args(moved, iters=iters, exit_interval=3, **before, **extra), world_before)
    _run(tmp_path, base_args(moved, iters=iters, **after, **extra), world_after)
    a = straight_run
    b = step_metrics(os.path.join(moved, "metrics.jsonl"))
    for key in STEP_KEYS:
        assert sorted(b[key]) == list(range(1, iters + 1)), key
        for it in range(1, iters + 1):
            assert b[key][it] == pytest.approx(a[key][it], rel=1e-5), (key, it)


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    save = str(tmp_path / "run")
    proc = spawn(base_args(save, iters=400))
    deadline = time.time() + 120
    metrics = os.path.join(save, "metrics.jsonl")
    while time.time() < deadline and not (os.path.exists(metrics) and len(losses(metrics)) >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "exiting at iteration" in out and "signal SIGTERM" in out
    saved = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert saved >= 3 and saved == max(losses(metrics))
    resumed = spawn(base_args(save, iters=saved + 2))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from iteration {saved}" in out
    assert max(losses(metrics)) == saved + 2


def test_exit_duration_stops_saves_and_says_why(tmp_path):
    """--exit-duration-in-mins 0: the limit has passed after the first iteration."""
    save = str(tmp_path / "run")
    proc = spawn(base_args(save, iters=50) + ["--exit-duration-in-mins", "0"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "exiting at iteration 1: time limit reached" in out
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "1"
    assert "validation at" not in out  # a run stopped early is not evaluated


def test_lr_schedule_matches_reference(tmp_path):
    """Linear warmup from 0, then cosine to 0.1·lr at the last iteration (spec §5)."""
    save = str(tmp_path / "run")
    iters, warmup, lr = 12, 4, 1e-2
    args = base_args(save, iters=iters)
    args[args.index("--lr") + 1] = str(lr)
    args[args.index("--lr-warmup-iters") + 1] = str(warmup)
    _run(tmp_path, args)
    got = {}
    for line in open(os.path.join(save, "metrics.jsonl")):
        r = json.loads(line)
        if "lr" in r:
            got[r["iteration"]] = r["lr"]
    assert sorted(got) == list(range(1, iters + 1)), f"learning rates logged at {sorted(got)}"
    for it, value in got.items():
        s = it - 1  # scheduler steps taken before this iteration's update
        mult = (
            s / warmup
            if s < warmup
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (iters - warmup)))
        )
        assert value == pytest.approx(lr * mult, rel=1e-9, abs=1e-15), it


def test_metrics_file_contents(tmp_path):
    save = str(tmp_path / "run")
    args = base_args(save, iters=4, telemetry_interval=2)
    args[args.index("--eval-interval") + 1] = "2"
    _run(tmp_path, args)
    records = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    steps = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    tele = [r for r in records if "telemetry" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"iteration", "lm_loss", "lr", "grad_norm", "tokens_per_s", "gpas_scales"} <= set(r)
        assert len(r["gpas_scales"]) == 4
    assert [r["iteration"] for r in evals] == [2, 4]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"])) for r in evals)
    assert [r["iteration"] for r in tele] == [2, 4]
    rows = tele[0]["telemetry"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    assert all(
        row["rms_after_attn"] > 0
        and row["rms_after_mlp"] > 0
        and row["grad_norm"] > 0
        and "gpas_scale" in row
        for row in rows
    )


def _nan_worker(save):
    """Poison the embedding output for every forward after iteration 2."""
    import torch

    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.components.counters import RunCounters
    from megatron_ext.training.contract import TrainingStopped
    from megatron_ext.training.trainer import Trainer

    cfg = parse_run_config(base_args(save, iters=20, nan_skip_limit=3))
    trainer = Trainer(cfg)
    trainer.setup()
    gpt = trainer.model[0].module
    snapshot = {}

    def poison(module, inputs, output):
        if trainer.state.iteration >= 2:
            if not snapshot:
                snapshot.update({n: p.detach().clone() for n, p in gpt.named_parameters()})
            return output * float("nan")
        return output

    gpt.embedding.register_forward_hook(poison)
    with trainer:
        try:
            trainer.train()
        except TrainingStopped as err:
            unchanged = all(torch.equal(snapshot[n], p.detach()) for n, p in gpt.named_parameters())
            return {
                "stopped": str(err),
                "iteration": trainer.state.iteration,
                "unchanged": unchanged,
                "skipped": trainer.components.find(RunCounters).skipped_total,
            }
    return {"stopped": None}


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    save = str(tmp_path / "run")
    (result,) = run_ranks(_nan_worker, 1, (save,), tmp_path)
    assert result["stopped"] and "--nan-skip-limit" in result["stopped"]
    assert result["iteration"] == 5 and result["skipped"] == 3
    assert result["unchanged"]  # skipped steps did not touch the weights
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "5"


def test_yaml_config_with_command_line_override(tmp_path):
    from megatron_ext.planning.arguments import parse_run_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "model-size: 71m\nnorm_type: sandwich_gpas\nlr: 0.002\n"
        "clip-gate-grad: 0.01\nmock-data: true\n"
    )
    cfg = parse_run_config(["--config", str(cfg_file), "--lr", "0.003"])
    assert cfg.model.hidden_size == 512 and cfg.model.norm_type == "sandwich_gpas"
    assert cfg.optim.lr == 0.003 and cfg.optim.clip_gate_grad == 0.01 and cfg.data.mock_data


@pytest.mark.parametrize(
    "args,message",
    [
        (["--norm-type", "preln"], "--norm-type: unknown norm type"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size"),
        (["--lr-warmup-iters", "50", "--train-iters", "10"], "--lr-warmup-iters"),
        (["--fp8-format", "hybrid"], "--fp8-format: needs --transformer-impl transformer_engine"),
        (["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-model: required"),
        (["--save-interval", "5"], "--save-interval: needs --save"),
    ],
)
def test_config_errors_name_the_flag(args, message):
    base = [
        "--device",
        "cpu",
        "--model-size",
        "tiny",
        "--mock-data",
        "--vocab-size",
        "512",
        "--train-iters",
        "10",
    ]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *base, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == exit_codes.BAD_INPUT, proc.stderr[-2000:]
    assert message in proc.stderr


def test_command_line_turns_off_a_yaml_boolean(tmp_path):
    from megatron_ext.planning.arguments import parse_run_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("sequence-parallel: true\nbf16: true\nmock-data: true\n")
    cfg = parse_run_config(["--config", str(cfg_file), "--no-sequence-parallel"])
    assert cfg.parallel.sequence_parallel is False and cfg.optim.bf16 is True
    tied = parse_run_config(["--no-untie-embeddings-and-output-weights", "--mock-data"])
    assert tied.model.untie_embeddings_and_output_weights is False
    assert parse_run_config(["--mock-data"]).model.untie_embeddings_and_output_weights is True


def test_fp8_flags_reach_the_transformer_config():
    from megatron_ext.config import ConfigError
    from megatron_ext.planning.arguments import parse_run_config

    gpu_te = ["--device", "cuda", "--transformer-impl", "transformer_engine", "--mock-data"]
    gpu_te += ["--model-size", "130m"]  # FFN 2048: FP8-compatible shapes
    cfg = parse_run_config(
        [*gpu_te, "--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"]
    ).validate(1)
    assert cfg.optim.fp8_transformer_config() == {
        "fp8": "e4m3",
        "fp8_recipe": "tensorwise",
        "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max",
        "fp8_margin": 0,
    }
    assert parse_run_config([*gpu_te, "--bf16"]).validate(1).optim.fp8_transformer_config() == {}
    for bad, flag in [
        (["--bf16", "--fp8-format", "e5m2"], "--fp8-format"),
        (["--fp8-format", "hybrid"], "--fp8-format: needs --bf16"),
        (["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "mx"], "--fp8-recipe"),
        (["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "0"], "--fp8-amax"),
        (["--bf16", "--fp8-format", "hybrid", "--fp8-amax-compute-algo", "mean"], "--fp8-amax"),
        # the reference 1b shape (FFN 5461) cannot run FP8 GEMMs: the error says what would
        (["--bf16", "--fp8-format", "hybrid", "--model-size", "1b"], "--ffn-hidden-size 5472"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            parse_run_config([*gpu_te, *bad]).validate(1)


def test_fusion_defaults_follow_the_device_and_flags_override_them():
    from megatron_ext.config import ConfigError
    from megatron_ext.planning.arguments import parse_run_config

    def fields(*argv):
        cfg = parse_run_config(["--mock-data", *argv]).validate(1)
        return cfg.fusion.transformer_config(cfg.device, cfg.transformer_impl)

    from megatron.core.transformer.enums import AttnBackend

    names = ["bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"]
    off = dict.fromkeys([*names, "cross_entropy_loss_fusion"], False)
    off["attention_backend"] = "auto"  # SDPA with the local spec
    assert fields("--device", "cpu") == off
    on_gpu = {**off, "bias_activation_fusion": True, "bias_dropout_fusion": True}
    assert fields("--device", "cuda") == on_gpu
    te = fields("--device", "cuda", "--transformer-impl", "transformer_engine")
    assert te == {**on_gpu, "apply_rope_fusion": True}
    assert fields("--device", "cuda", "--no-bias-swiglu-fusion")["bias_activation_fusion"] is False
    assert fields("--device", "cpu", "--bias-dropout-fusion")["bias_dropout_fusion"] is True
    ce = fields("--device", "cpu", "--bf16", "--cross-entropy-loss-fusion")
    assert ce["cross_entropy_loss_fusion"] is True
    local = fields("--device", "cpu", "--attention-backend", "local")["attention_backend"]
    assert local == "local"
    from megatron_ext.models.gpt import build_transformer_config

    built = build_transformer_config(parse_run_config(["--mock-data"]).model, use_cpu=True,
                                     attention_backend=local)  # fmt: skip
    assert built.attention_backend is AttnBackend.local
    for bad, message in [
        (["--attention-backend", "flash"], "--attention-backend: flash, fused and unfused are"),
        (["--attention-backend", "sdpa"], "--attention-backend: choose one of"),
        (["--device", "cuda", "--rope-fusion"], "--rope-fusion: is a Transformer Engine kernel"),
        (["--cross-entropy-loss-fusion"], "--cross-entropy-loss-fusion: rounds the logits"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_run_config(["--mock-data", *bad]).validate(1)


def test_yaml_unknown_key_is_reported(tmp_path):
    from megatron_ext.config import ConfigError
    from megatron_ext.planning.arguments import parse_run_config

    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("learning-rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning-rate'"):
        parse_run_config(["--config", str(cfg_file)])


def test_dry_run_plans_the_7b_recipe_and_refuses_bad_layouts():
    base = [
        sys.executable,
        os.path.join(ROOT, "pretrain_gpas.py"),
        "--dry-run",
        "--model-size",
        "7b",
        "--mock-data",
        "--bf16",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "2048",
        "--train-iters",
        "150000",
    ]
    ok = subprocess.run(
        base
        + [
            "--world-size",
            "64",
            "--tensor-model-parallel-size",
            "2",
            "--use-distributed-optimizer",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "64 GPUs = TP 2 × PP 1 × DP 32" in ok.stdout
    assert "78.64B token slots" in ok.stdout  # 150k × 2048 × 256 (spec §5)
    # mock data with Megatron's null tokenizer: 32,001 ids (its EOD is one past --vocab-size),
    # padded to 32,128: 128 × 4,096 × 2 more than 32,000 rows in the embedding and output layer
    assert "6,739,464,224 (6,739.5M) in total" in ok.stdout
    bad = subprocess.run(
        base + ["--world-size", "8", "--tensor-model-parallel-size", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == exit_codes.BAD_INPUT and "--tensor-model-parallel-size" in bad.stderr


def test_per_document_order_resumes_exactly_under_another_layout(tmp_path):
    """Per-document samples (a real indexed dataset, the Feistel order): 6 steps on one process
    equal 3 steps on DP 2 resumed for 3 more on one process, step by step."""
    import numpy as np

    from megatron_ext.data.indexed_writer import IndexedDatasetWriter

    rng = np.random.default_rng(1)
    lengths = rng.integers(4, 60, size=300).astype(np.int32)
    prefix = str(tmp_path / "docs_text_document")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents(rng.integers(2, 500, size=int(lengths.sum())).astype(np.uint16), lengths)
    writer.finalize()

    def args(save, **extra):
        argv = base_args(save, iters=6, adam_eps=1e-6, **extra)
        argv.remove("--mock-data")
        return argv + ["--data-path", prefix, "--data-mode", "per-document", "--split",
                       "95,5,0", "--tokenizer-type", "NullTokenizer"]  # fmt: skip

    straight = str(tmp_path / "straight")
    _run(tmp_path, args(straight))
    moved = str(tmp_path / "moved")
    _run(tmp_path, args(moved, exit_interval=3), 2)
    _run(tmp_path, args(moved))
    a = step_metrics(os.path.join(straight, "metrics.jsonl"))
    b = step_metrics(os.path.join(moved, "metrics.jsonl"))
    assert sorted(b["lm_loss"]) == list(range(1, 7))
    for it in range(1, 7):
        assert b["lm_loss"][it] == pytest.approx(a["lm_loss"][it], rel=1e-5), it
        assert b["grad_norm"][it] == pytest.approx(a["grad_norm"][it], rel=1e-5), it
