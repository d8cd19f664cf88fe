"""`--dry-run` plans the run training builds: the tokenizer's vocabulary, the iterations of
`--epochs`, CPU ranks named as such; its parameter count equals the built model's."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers.dist_workers import run_ranks

pytestmark = pytest.mark.slow

TINY = ["--device", "cpu", "--model-size", "tiny", "--norm-type", "pre_gpas", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "1e-3", "--eval-iters", "0", "--num-workers", "0"]  # fmt: skip


def _dry_run(args) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), *args,
                           "--dry-run"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _planned_parameters(out: str) -> int:
    return int(re.search(r"^parameters: ([\d,]+) ", out, re.M).group(1).replace(",", ""))


def _built_parameters(args):
    from megatron_ext.models.gpt import unwrap_model
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    with Trainer(parse_run_config(args)) as trainer:
        trainer.setup()
        return sum(p.numel() for c in trainer.model for p in unwrap_model(c).parameters())


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "null"])
def test_the_planned_parameters_are_the_built_models(tokenizer, mistral_model, tmp_path):
    if tokenizer == "sentencepiece":  # a 32,000-piece vocabulary, not the --vocab-size default
        flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", mistral_model]
    else:  # Megatron's null tokenizer: its EOD is one id past --vocab-size
        flags = ["--vocab-size", "1000"]
    args = [*TINY, "--mock-data", *flags, "--save", str(tmp_path / "run")]
    out = _dry_run(args)
    assert "layout: 1 CPU ranks = TP 1 × PP 1 × DP 1" in out and "memory per rank" in out
    (built,) = run_ranks(_built_parameters, 1, (args,), tmp_path)
    assert _planned_parameters(out) == built


def test_the_plan_takes_its_iterations_from_epochs(mistral_model, tmp_path):
    from megatron_ext.data.sft import write_sft_dataset
    from megatron_ext.data.tokenizers import build_tokenizer

    records = [{"messages": [{"role": "user", "content": f"say {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]}
               for i in range(10)]  # fmt: skip
    (tmp_path / "chat.json").write_text(json.dumps(records))
    tok = build_tokenizer("SentencePieceTokenizer", mistral_model)
    write_sft_dataset([str(tmp_path / "chat.json")], tok, str(tmp_path / "chat"), seq_length=32)
    args = [*TINY, "--sft", "--data-path", str(tmp_path / "chat"), "--split", "100,0,0",
            "--epochs", "3", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", mistral_model]  # fmt: skip
    out = _dry_run(args)
    iterations = math.ceil(3 * 10 / 4)  # 3 epochs of 10 examples, global batch 4
    assert f"training: {iterations} iterations" in out, out
