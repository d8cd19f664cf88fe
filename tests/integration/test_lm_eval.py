"""Exports evaluated by lm-evaluation-harness (its HF model class, the `lm_eval` CLI) on a small
local multiple-choice task shipped in tests/data: for both export targets, every
continuation's log-likelihood must equal our own model's on the same tokens."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.tool_commands import TINY_CPU_RUN

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="pip install lm-eval accelerate (or bash run_tests.sh)")

TASK_DIR = os.path.join(ROOT, "tests", "data", "lm_eval_task")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mistral_model):
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = root / "ckpt"
    flags = [*TINY_CPU_RUN, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             mistral_model, "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1",
             "--eval-iters", "0", "--save", str(ckpt)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for target in ("gpas", "llama"):
        tool = os.path.join(ROOT, "tools", "convert_to_hf.py")
        args = ["--load", str(ckpt), "--output", str(root / target), "--target", target]
        proc = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _our_loglikelihood(model, vocab, tokenizer, context, continuation):
    """lm-eval's pairing: the continuation's tokens are those of context+continuation after
    the context's own tokens; no BOS."""
    from megatron_ext.export.megatron_model import megatron_logits

    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    logp = torch.log_softmax(megatron_logits(model, torch.tensor([whole]), vocab).double(), -1)
    return sum(logp[0, i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("target", ["gpas", "llama"])
def test_lm_eval_loglikelihoods_match_our_model(trained, tmp_path, target):
    from tokenizers import Tokenizer

    from megatron_ext.checkpoint.weights import load_model
    from megatron_ext.export.dcp_reader import DistCheckpointReader
    from megatron_ext.export.megatron_model import build_cpu_model

    export = trained / target
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    model_args = f"pretrained={export},dtype=float32" + (
        ",trust_remote_code=True" if target == "gpas" else ""
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            model_args,
            "--tasks",
            "gpas_local_mc",
            "--include_path",
            TASK_DIR,
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--log_samples",
            "--output_path",
            str(tmp_path / "out"),
        ],
        cwd=TASK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples_file = glob.glob(str(tmp_path / "out" / "*" / "samples_gpas_local_mc_*.jsonl"))
    samples = [json.loads(line) for line in open(samples_file[0])]
    assert len(samples) == 8

    reader = DistCheckpointReader(str(trained / "ckpt"))
    cfg = reader.model_config()
    ours = build_cpu_model(cfg)
    load_model([ours], reader.directory)
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    compared, correct = 0, 0
    for sample in samples:
        scores = []
        for i, args in enumerate(sample["arguments"].values()):
            theirs = float(sample["filtered_resps"][i][0])
            mine = _our_loglikelihood(ours, cfg.vocab_size, tokenizer, args["arg_0"], args["arg_1"])
            assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-4), (sample["doc_id"], i)
            assert math.isfinite(mine) and mine < 0
            scores.append(mine)
            compared += 1
        correct += int(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"])
    assert compared == 24
    results = json.load(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]))
    acc = results["results"]["gpas_local_mc"]["acc,none"]
    assert acc == pytest.approx(correct / len(samples))  # lm-eval's score from the same numbers
