"""The data path at the start of a run: ``--prepare-data-only`` builds exactly the packed index
cache that training with the same flags finds (training then builds nothing and says nothing
about it; both go through ``data_setup.run_datasets``, whose build line the preparation shows
with its expected time), and ``--dry-run`` counts the real tokens of the run from the
documents' lengths (checked against a count made here from the lengths written)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data.indexed_writer import IndexedDatasetWriter
from tests.helpers import ROOT

EOD = 1
SEQ = 32
BUILD_LINE = (
    r"data: no cached train index for \S+ \(seed 7, [\d,]+ samples\): building it on this rank "
    r"from [\d,]+ documents, ~\d+ s expected"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """400 documents of 3 … 120 tokens (each ending in EOD), and their lengths."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=400).astype(np.int32)
    prefix = str(tmp_path_factory.mktemp("data") / "c4_text_document")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    tokens = np.concatenate([np.append(rng.integers(2, 500, n - 1), EOD) for n in lengths])
    writer.add_documents(tokens.astype(np.uint16), lengths)
    writer.finalize()
    return prefix, lengths


def _pretrain(prefix, tmp_path, *extra, iters=4):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), "--device", "cpu",
           "--model-size", "tiny", "--data-path", prefix, "--tokenizer-type", "NullTokenizer",
           "--vocab-size", "500", "--seq-length", str(SEQ), "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "1e-3",
           "--eval-interval", "100", "--eval-iters", "1", "--num-workers", "0", "--seed", "7",
           "--log-interval", "1",
           "--split", "95,5,0", "--data-cache-path", str(tmp_path / "cache"),
           "--save", str(tmp_path / "run"),
           *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_prepared_data_is_what_training_finds(dataset, tmp_path):
    prefix, _ = dataset
    prepared = _pretrain(prefix, tmp_path, "--prepare-data-only")
    assert re.search(BUILD_LINE, prepared), prepared[-2000:]
    assert re.search(r"data: train index ready: [\d,]+ samples", prepared)
    assert os.listdir(tmp_path / "cache") and not (tmp_path / "run").exists()  # nothing trained
    trained = _pretrain(prefix, tmp_path)
    assert "data: no cached" not in trained, trained[-2000:]
    assert re.search(r"iter\s+4/4", trained)


def test_dry_run_counts_the_real_tokens_of_both_modes(dataset, tmp_path):
    prefix, lengths = dataset
    documents = int(round(0.95 * len(lengths)))  # --split 95,5,0, rounded as megatron-core
    train = lengths[:documents]
    slots = 50 * 4 * SEQ
    packed = _pretrain(prefix, tmp_path, "--dry-run", iters=50)
    line = re.search(
        r"^data: ([\d,]+) documents, .*; ([\d.]+) epochs over it; packed", packed, re.M
    )
    assert line, packed[-2000:]
    assert int(line[1].replace(",", "")) == documents
    assert float(line[2]) == pytest.approx(slots / train.sum(), abs=0.01)
    per_doc = _pretrain(prefix, tmp_path, "--dry-run", "--data-mode", "per-document", iters=50)
    line = re.search(r"per-document: ≈([\d.]+)k real tokens \(([\d.]+)% of the slots", per_doc)
    assert line, per_doc[-2000:]
    # each sample: its document's first SEQ tokens (the last an EOD), the rest padding
    expected = 50 * 4 * np.minimum(train, SEQ).mean()
    assert float(line[1]) * 1e3 == pytest.approx(expected, abs=10)
    assert float(line[2]) / 100 == pytest.approx(expected / slots, abs=0.001)
