"""bench/bench_scale.py at a small fraction of C4 en: the simulated dataset is a real indexed
dataset of the fraction's documents, and the result has every figure for both modes (its shape,
not a time: the numbers themselves are for bench/RESULTS.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_the_scale_benchmark_measures_both_modes(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_scale.py"), "--fraction", "0.0001",
         "--samples", "20000", "--workdir", str(tmp_path), "--keep"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["documents"] == round(0.0001 * 364_868_892) and result["samples"] == 20000
    assert set(result["modes"]) == {"packed", "per-document"}
    for mode, runs in result["modes"].items():
        for run in ("cold", "cache_hit"):
            figures = runs[run]
            assert set(figures) >= {"checks_s", "start_s", "first_sample_s", "peak_rss_mb",
                                    "last_epoch_sample_s", "data_rss_mb"}  # fmt: skip
            assert all(figures[k] >= 0 for k in figures)
            assert figures["samples"] >= 20000
        assert (runs["cache_gb"] > 0) == (mode == "packed")  # only packed builds an index
    assert "data: no cached train index" in proc.stderr  # the cold packed run said so

    # the simulated data: a real .idx of that many documents with C4 en's mean length, and a
    # .bin of exactly the size it describes, holding no blocks
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "c4_0.0001" / "c4_text_document")
    dataset = IndexedDataset(prefix)  # megatron-core reads it (and holds its memory map)
    lengths = np.array(dataset.sequence_lengths)
    assert len(lengths) == result["documents"]
    assert np.mean(lengths) == pytest.approx(427, rel=0.05)
    stat = os.stat(prefix + ".bin")
    assert stat.st_size == 2 * int(lengths.sum(dtype=np.int64)) and stat.st_blocks == 0
