"""Parallel layouts reproduce the single-process run (2 gloo ranks on CPU), for every norm type:
TP=2, PP=2, DP=2 with the distributed optimizer, also with the gradient reductions and parameter
all-gathers overlapped with compute — the same per-step losses over
3 optimizer steps with global and gate clipping on. Checkpoints saved under TP=2 and PP=2 load at
TP=1/PP=1 with the same logits."""

import math

import pytest
import torch

from megatron_ext.variants import NORM_TYPE_NAMES
from tests.conftest import assert_rel_close
from tests.dist_workers import PARITY_STEPS, run_ranks, synthetic_batches, train_layout

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "dp2_distopt": dict(use_distributed_optimizer=True),
    # gradient buckets (≈ 20k elements, several per model) reduced during backward, and the
    # parameters all-gathered bucket by bucket during the next forward
    "dp2_distopt_overlap": dict(
        use_distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        ddp_bucket_size=20000,
    ),
    # with pipelining each stage starts its reductions from the schedule (grad_sync_func)
    "pp2_overlap": dict(
        pipeline_model_parallel_size=2, overlap_grad_reduce=True, ddp_bucket_size=20000
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process and 2-rank runs of all norm types, each saving its trained weights."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, layout in {"single": {}, **LAYOUTS}.items():
        world = 1 if name == "single" else 2
        per_rank = run_ranks(train_layout, world, (layout, NORM_TYPE_NAMES, str(root / name)), root)
        merged = {}
        for nt in NORM_TYPE_NAMES:
            losses = [r[nt]["losses"] for r in per_rank if r[nt]["losses"][0] is not None]
            evals = [r[nt]["eval_loss"] for r in per_rank if r[nt]["eval_loss"] is not None]
            merged[nt] = {"losses": losses[0], "eval_loss": evals[0]}
        out[name] = merged
    out["root"] = root
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("norm_type", NORM_TYPE_NAMES)
def test_layout_reproduces_single_process_losses(runs, layout, norm_type):
    single = runs["single"][norm_type]["losses"]
    parallel = runs[layout][norm_type]["losses"]
    assert len(single) == len(parallel) == PARITY_STEPS
    assert single[0] == pytest.approx(math.log(512), abs=0.05)  # near-uniform at init
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, parallel, strict=True)):
        assert b == pytest.approx(a, rel=1e-5), f"step {step}: single {a} vs {layout} {b}"


def _load_tp1(norm_type, directory):
    from megatron_ext.models.gpt import build_model, build_transformer_config
    from megatron_ext.models.presets import model_preset
    from megatron_ext.training.checkpointing import load_model

    cfg = model_preset("tiny4", norm_type=norm_type)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu=True), seed=0)
    load_model([model], directory)
    return cfg, model


@pytest.mark.parametrize("norm_type", NORM_TYPE_NAMES)
def test_checkpoints_from_tp2_and_pp2_load_at_tp1(megatron_cpu, runs, norm_type):
    root = runs["root"]
    logits = {}
    for layout in ("single", "tp2", "pp2"):
        cfg, model = _load_tp1(norm_type, str(root / layout / norm_type))
        batch = synthetic_batches(
            seed=5, num_batches=2, global_batch=4, seq_length=cfg.seq_length, vocab=cfg.vocab_size
        )[-1]
        tokens = batch["tokens"]
        positions = torch.arange(cfg.seq_length).unsqueeze(0).expand(tokens.shape[0], -1)
        with torch.no_grad():
            logits[layout] = model(tokens, positions, None)
            per_token = model(tokens, positions, None, labels=batch["labels"])
        # The loss of the loaded model equals the loss the saving layout evaluated in place.
        mask = batch["loss_mask"]
        loaded_loss = ((per_token * mask).sum(1) / mask.sum(1)).mean().item()
        assert loaded_loss == pytest.approx(runs[layout][norm_type]["eval_loss"], rel=1e-5)
        if norm_type.endswith("_gpas"):
            gates = [p.item() for n, p in model.named_parameters() if n.endswith("gpas_gate")]
            assert all(g != 0.0 for g in gates)  # trained gates travelled through the checkpoint
    # Across layouts the weights differ only by the fp32 rounding of three training steps.
    for layout in ("tp2", "pp2"):
        assert_rel_close(logits[layout], logits["single"], 1e-4, f"{layout} logits")
