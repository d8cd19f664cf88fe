"""Supervised fine-tuning on CPU: LISA trains exactly the sampled layers (bit for bit), keeps
the others' Adam state, agrees across layouts, resumes mid-interval exactly; gates frozen under
--sft; --epochs."""

import json
import math
import os
import random

import pytest
import torch

from megatron_ext.resilience import exit_codes
from tests.helpers.cli_runs import STEP_KEYS, step_metrics
from tests.helpers.dist_workers import run_cli, run_ranks

pytestmark = pytest.mark.slow

SEQ = 128


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, mistral_model):
    """60 arithmetic questions in Commonsense170K's format, preprocessed."""
    from megatron_ext.data.sft import write_sft_dataset
    from megatron_ext.data.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    records = []
    for i in range(60):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        records.append({
            "instruction": f"What is {a} plus {b}?\n\nAnswer format: number",
            "input": "" if i % 3 else "Use base ten.",
            "output": f"the correct answer is {a + b}",
            "answer": str(a + b),
        })  # fmt: skip
    (root / "cs.json").write_text(json.dumps(records))
    tok = build_tokenizer("SentencePieceTokenizer", mistral_model)
    summary = write_sft_dataset([str(root / "cs.json")], tok, str(root / "cs"), seq_length=SEQ)
    assert summary.examples == 60
    return str(root / "cs")


def sft_args(data, tokenizer, save, iters=6, **extra):
    args = [
        "--device", "cpu", "--model-size", "tiny4", "--norm-type", "pre_gpas", "--sft",
        "--data-path", data, "--split", "90,10,0", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tokenizer, "--seq-length", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "3e-3",
        "--lisa-layers", "2", "--lisa-interval", "3", "--log-interval", "1",
        "--eval-interval", "100", "--eval-iters", "1", "--num-workers", "0", "--seed", "5",
        "--save", save, "--load", save,
    ]  # fmt: skip
    for k, v in extra.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args


def _snapshot(gpt, optimizer):
    params = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    by_param = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for p, st in sub.optimizer.state.items():
            by_param[p] = {k: v.detach().clone() for k, v in st.items()}
    names = {p: n for n, p in gpt.named_parameters()}
    states = {names[p]: st for p, st in by_param.items() if p in names}
    return params, states


def _lisa_worker(data, tokenizer, save, extra):
    """Snapshot weights and Adam states at the start of the second LISA interval and at its end."""
    from megatron_ext.layers.transformer_layer import is_gpas_gate
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.components.lisa import Lisa
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(parse_run_config(sft_args(data, tokenizer, save, iters=6, **extra)))
    trainer.setup()
    gpt = trainer.model[0].module
    seen = {"gates": {n for n, p in gpt.named_parameters() if is_gpas_gate(p)}}

    def hook(module, inputs, output):
        if trainer.state.iteration == 3 and "before" not in seen:
            seen["before"] = _snapshot(gpt, trainer.optimizer)
        return output

    gpt.embedding.register_forward_hook(hook)
    # Every weight gradient autograd computes reaches the parameter's accumulator node (DDP's
    # hook hangs there too); count them per layer during the second interval.
    seen["wgrads"] = {}

    def counter(layer):
        def count(*_):
            if trainer.state.iteration >= 3:
                seen["wgrads"][layer] = seen["wgrads"].get(layer, 0) + 1

        return count

    keep = []
    for name, p in gpt.named_parameters():
        if p.requires_grad and _layer_of(name) is not None:
            node = p.expand_as(p).grad_fn.next_functions[0][0]
            node.register_hook(counter(_layer_of(name)))
            keep.append(node)
    with trainer:
        trainer.train()
    seen["after"] = _snapshot(gpt, trainer.optimizer)
    return seen, trainer.components.find(Lisa).active


def _layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("decoder.layers.") else None


@pytest.mark.parametrize("gates", ["frozen", "trained"])
def test_lisa_updates_exactly_the_sampled_layers(sft_data, mistral_model, tmp_path, gates):
    from megatron_ext.training.components.lisa import sample_layers

    extra = {} if gates == "frozen" else {"no_freeze_gates": True}
    ((seen, active),) = run_ranks(
        _lisa_worker, 1, (sft_data, mistral_model, str(tmp_path / "run"), extra), tmp_path
    )
    assert active == sample_layers(5, 1, 4, 2)  # interval 1 = iterations 4-6, seed 5
    # weight gradients were computed for the sampled layers only (3 steps × 2 micro-batches)
    assert set(seen["wgrads"]) == set(active)
    assert all(count % 6 == 0 for count in seen["wgrads"].values()), seen["wgrads"]
    (p0, s0), (p1, s1) = seen["before"], seen["after"]
    assert len(seen["gates"]) == 4
    for name in p0:
        changed = not torch.equal(p0[name], p1[name])
        layer = _layer_of(name)
        if name in seen["gates"]:  # frozen under --sft; else trained with its layer
            assert changed is (gates == "trained" and layer in active), name
        elif layer is None:  # embeddings, final norm, output layer: always trained
            assert changed, name
        else:
            assert changed is (layer in active), name
            if layer not in active:  # its Adam state, untouched
                assert name in s0 and name in s1, name  # created up front for every layer
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(s0[name][key], s1[name][key]), (name, key)


def _straight_and_split(tmp_path, data, tokenizer, world, **layout):
    straight = str(tmp_path / "straight")
    assert run_ranks(run_cli, world, (sft_args(data, tokenizer, straight, iters=8, **layout),),
                     tmp_path) == [0] * world  # fmt: skip
    split = str(tmp_path / "split")
    first = sft_args(data, tokenizer, split, iters=8, exit_interval=4, **layout)
    assert run_ranks(run_cli, world, (first,), tmp_path) == [0] * world
    assert run_ranks(run_cli, world, (sft_args(data, tokenizer, split, iters=8, **layout),),
                     tmp_path) == [0] * world  # fmt: skip
    return (
        step_metrics(os.path.join(straight, "metrics.jsonl")),
        step_metrics(os.path.join(split, "metrics.jsonl")),
    )


@pytest.mark.parametrize(
    "layout,world",
    [({}, 1), ({"use_distributed_optimizer": True}, 2)],
    ids=["single", "dp2_distopt"],
)
def test_sft_with_lisa_resumes_mid_interval_exactly(
    sft_data, mistral_model, tmp_path, layout, world
):
    """Stopped at iteration 4, inside the interval 4-6: the same layers, the same Adam steps."""
    a, b = _straight_and_split(tmp_path, sft_data, mistral_model, world, **layout)
    assert sorted(b["lm_loss"]) == list(range(1, 9))
    assert a == b


def _single_run(tmp_path, data, tokenizer):
    save = str(tmp_path / "single")
    assert run_ranks(run_cli, 1, (sft_args(data, tokenizer, save, iters=6),), tmp_path) == [0]
    return step_metrics(os.path.join(save, "metrics.jsonl"))


@pytest.mark.parametrize(
    "layout",
    [
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        {"pipeline_model_parallel_size": 2, "overlap_grad_reduce": True,
         "ddp_bucket_size": 40000},
        {"use_distributed_optimizer": True, "overlap_grad_reduce": True,
         "ddp_bucket_size": 40000},
    ],
    ids=["tp2_sp", "pp2_overlap", "dp2_distopt_overlap"],
)  # fmt: skip
def test_lisa_under_parallel_layouts_matches_one_process(sft_data, mistral_model, tmp_path, layout):
    """A pipeline stage may hold none of the sampled layers; every rank samples alike; with
    overlapped reduction in small buckets (each holding parts of several layers), buckets with
    idle layers still launch."""
    single = _single_run(tmp_path, sft_data, mistral_model)
    save = str(tmp_path / "parallel")
    args = sft_args(sft_data, mistral_model, save, iters=6, **layout)
    assert run_ranks(run_cli, 2, (args,), tmp_path) == [0, 0]
    parallel = step_metrics(os.path.join(save, "metrics.jsonl"))
    for key in STEP_KEYS:
        if key == "gate_grad_norm":
            continue  # the gates are frozen under --sft
        for it in range(1, 7):
            assert parallel[key][it] == pytest.approx(single[key][it], rel=2e-5), (key, it)


def test_epochs_set_the_iterations(sft_data, mistral_model, tmp_path):
    """54 training examples (90 % of 60), global batch 4, 2 epochs: ⌈108 / 4⌉ = 27."""
    save = str(tmp_path / "run")
    args = sft_args(sft_data, mistral_model, save, iters=1, epochs=2, lisa_layers=0)
    assert run_ranks(run_cli, 1, (args,), tmp_path) == [0]
    metrics = step_metrics(os.path.join(save, "metrics.jsonl"))
    assert max(metrics["lm_loss"]) == math.ceil(2 * 54 / 4) == 27
    records = [json.loads(x) for x in open(os.path.join(save, "metrics.jsonl"))]
    assert not any("lisa_active" in r for r in records)  # --lisa-layers 0: every layer trains


def _chat_records(short: int, long: int) -> list:
    """Chat records whose prompt is a few tokens (``short``) or fills far more than 32
    (``long``: the response falls past a 32-token window)."""
    words = "the quick brown fox jumps over the lazy dog " * 8
    return [
        {"messages": [{"role": "user", "content": f"say {i}" if i < short else words + str(i)},
                      {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(short + long)
    ]  # fmt: skip


def _preprocess(tmp_path, tokenizer, records, name, **kw):
    from megatron_ext.data.sft import write_sft_dataset
    from megatron_ext.data.tokenizers import build_tokenizer

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer)
    return write_sft_dataset([str(path)], tok, str(tmp_path / name), **kw), str(tmp_path / name)


def _pretrain(args):
    import subprocess
    import sys

    from tests.helpers import ROOT

    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _short_run_args(data, tokenizer, save, **extra):
    args = sft_args(data, tokenizer, save, iters=1, seq_length=32, lisa_layers=0, **extra)
    at = args.index("--seq-length")
    del args[at : at + 2]  # sft_args' own
    return [a for a in args if a not in ("--split", "90,10,0")] + [
        "--split",
        "100,0,0",
        "--eval-iters",
        "0",
    ]


def test_examples_that_keep_no_loss_token_are_refused_or_counted(mistral_model, tmp_path):
    """Preprocessed without --seq-length, trained with a 32-token window: an example whose
    response falls past it teaches nothing; all such: an error; some: a warning with the count,
    and the epoch counts only the others. Never a run of loss 0.0."""
    _, all_long = _preprocess(tmp_path, mistral_model, _chat_records(0, 6), "long")
    proc = _pretrain(_short_run_args(all_long, mistral_model, str(tmp_path / "a"), epochs=1))
    assert proc.returncode == exit_codes.BAD_INPUT, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "none of the 6 examples of its train split keeps a token with " \
        "loss within --seq-length 32" in errors[0], proc.stderr[-2000:]  # fmt: skip

    _, mixed = _preprocess(tmp_path, mistral_model, _chat_records(10, 6), "mixed")
    save = str(tmp_path / "b")
    proc = _pretrain(_short_run_args(mixed, mistral_model, save, epochs=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 of the 16 training examples keep no token with loss within --seq-length 32" in (
        proc.stdout + proc.stderr
    )
    losses = step_metrics(os.path.join(save, "metrics.jsonl"))["lm_loss"]
    assert sorted(losses) == list(range(1, 6))  # ⌈2 × 10 / 4⌉ = 5: the 6 left out
    assert all(loss > 0.5 for loss in losses.values()), losses


def test_epochs_count_packed_blocks(mistral_model, tmp_path):
    texts = [{"text": f"Fact {i}: " + "water boils at one hundred degrees " * (1 + i % 3)}
             for i in range(40)]  # fmt: skip
    path = tmp_path / "lm.json"
    path.write_text(json.dumps({"type": "text_only", "instances": texts}))
    from megatron_ext.data.sft import write_sft_dataset
    from megatron_ext.data.tokenizers import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", mistral_model)
    summary = write_sft_dataset([str(path)], tok, str(tmp_path / "packed"), seq_length=32,
                                pack=True)  # fmt: skip
    save = str(tmp_path / "run")
    proc = _pretrain(_short_run_args(str(tmp_path / "packed"), mistral_model, save, epochs=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = step_metrics(os.path.join(save, "metrics.jsonl"))["lm_loss"]
    assert max(losses) == math.ceil(2 * summary.blocks / 4) and summary.blocks > 10


def _empty_batch_worker(data, tokenizer, save):
    """Iteration 2's micro-batches lose every loss token; the weights before and after it."""
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(parse_run_config(sft_args(data, tokenizer, save, iters=3, lisa_layers=0)))
    trainer.setup()
    gpt = trainer.model[0].module
    weights = {}
    original = trainer.data.train[0]

    def emptied():
        for batch in original:
            if trainer.state.iteration == 1:
                weights.setdefault("before", [p.detach().clone() for p in gpt.parameters()])
                batch = dict(batch, loss_mask=torch.zeros_like(batch["loss_mask"]))
            elif trainer.state.iteration == 2:
                weights.setdefault("after", [p.detach().clone() for p in gpt.parameters()])
            yield batch

    trainer.data.train = [emptied()]
    with trainer:
        trainer.train()
    return all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"],
                                                  strict=True))  # fmt: skip


def test_a_batch_without_loss_tokens_is_skipped_and_counted_not_logged_as_zero(
    sft_data, mistral_model, tmp_path
):
    save = str(tmp_path / "run")
    (unchanged,) = run_ranks(_empty_batch_worker, 1, (sft_data, mistral_model, save), tmp_path)
    assert unchanged  # no update from a batch with nothing to learn
    records = {r["iteration"]: r for r in map(json.loads, open(os.path.join(save, "metrics.jsonl")))
               if "lm_loss" in r}  # fmt: skip
    assert records[2]["lm_loss"] is None and records[2]["grad_norm"] is None
    assert records[2]["no_loss_iterations"] == 1 and records[2]["skipped_iterations"] == 1
    assert records[1]["lm_loss"] > 0.5 and records[3]["lm_loss"] > 0.5
