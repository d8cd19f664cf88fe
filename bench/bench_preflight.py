#!/usr/bin/env python3
"""What the training-start data checks cost on a large dataset, next to what start-up costs.

Builds a synthetic dataset of --gigabytes of uint16 tokens (C4-like documents of ~470 tokens,
the .bin written sparse, so it takes no disk), then times side by side, in one run:

* the preflight checks of that dataset (.idx read, .bin size, sidecar): ``check_dataset_files``
  and ``check_dataset_info``;
* megatron-core's own dataset build of the same prefix for one epoch of samples at sequence
  256 (what every run does at start anyway; its index cache is cleared first).

    python bench/bench_preflight.py --gigabytes 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_dataset(prefix: str, gigabytes: float, seed: int = 0) -> int:
    from megatron_ext.data.dataset_info import DatasetInfo
    from megatron_ext.data.indexed_writer import bin_path, idx_path, write_index

    tokens = int(gigabytes * 1e9) // 2
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 900, size=tokens // 470 + 1).astype(np.int32)
    lengths = lengths[np.cumsum(lengths.astype(np.int64)) <= tokens]
    total = int(lengths.astype(np.int64).sum())
    with open(bin_path(prefix), "wb") as f:
        f.truncate(total * 2)  # sparse: the checks read sizes, not contents
    write_index(idx_path(prefix), np.uint16, lengths)
    DatasetInfo(
        "SentencePieceTokenizer", "sha256:0", 32000, 1, 31999, len(lengths), total, "bench"
    ).write(prefix)
    return len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron_ext.config.data import DataConfig
    from megatron_ext.data.datasets import build_datasets
    from megatron_ext.planning.preflight import check_dataset_files, check_dataset_info
    from megatron_ext.platform.distributed import ensure_single_process_cpu

    ensure_single_process_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "big")
        docs = make_dataset(prefix, args.gigabytes)
        checks, builds = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            check_dataset_files("--data-path", prefix)
            check_dataset_info(
                prefix, vocab_size=32000, tokenizer_type="NullTokenizer", fingerprint=None,
                eod_id=1,
            )  # fmt: skip
            checks.append(time.perf_counter() - t0)
            cache = os.path.join(tmp, f"cache{i}")
            t0 = time.perf_counter()
            build_datasets(
                DataConfig(data_path=[prefix], split="100,0,0", data_cache_path=cache),
                seq_length=256, seed=1, vocab_size=32000, eod_id=1,
                num_samples=[int(args.gigabytes * 1e9 / 2 / 256), None, None],
            )  # fmt: skip
            builds.append(time.perf_counter() - t0)
    check, build = min(checks), min(builds)
    print(f"dataset: {args.gigabytes:g} GB of uint16 tokens, {docs:,} documents")
    print(f"preflight checks : {check * 1e3:8.1f} ms (best of {args.repeats})")
    print(f"dataset build    : {build * 1e3:8.1f} ms (megatron-core, packed, seq 256, no cache)")
    print(f"checks / build   : {check / build:.2%}")


if __name__ == "__main__":
    main()
