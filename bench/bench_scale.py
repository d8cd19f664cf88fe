"""The data path of the 7B recipe at C4 en's size, simulated: a real megatron-core ``.idx`` with
C4-en-shaped document lengths and a sparse ``.bin`` (no blocks written), then, in a fresh
process each, what a rank pays: the packed index's cold build on the building rank, the start
of a rank that finds the cache, the first sample and one from the last epoch, and peak RSS, for
the packed and per-document modes at the recipe's sample count.

    python bench/bench_scale.py --fraction 0.02 --workdir /tmp/scale        # 2% of C4 en
    python bench/bench_scale.py --fraction 0.25 1.0 --workdir /tmp/scale \\
        --out bench/results/scale.jsonl

Document lengths: lognormal with σ = 0.90 and mean 427 tokens. The mean is C4 en's (156B T5
tokens over 364.87M documents, the C4 paper and the dataset card); σ is the spread of log lengths
of the 30 real C4 en documents in ``../shared/data/c4-sample`` tokenized with the T5-style
unigram model there (0.902; their mean, 484, agrees). Each figure comes from its own process
(``resource.getrusage`` peak RSS, less the process's RSS after imports: the data path's own).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

C4_EN_DOCUMENTS = 364_868_892
C4_EN_MEAN_TOKENS = 427.0
LOG_SIGMA = 0.90
RECIPE = os.path.join(ROOT, "examples", "slurm", "recipes", "7b_pre_gpas.yaml")
CHUNK = 8_000_000  # documents written at a time (bounded memory at any size)


def write_dataset(prefix: str, documents: int, seed: int = 0) -> int:
    """A megatron-core indexed dataset of ``documents`` C4-shaped lengths (uint16 tokens): the
    real ``.idx``, a sparse ``.bin``. Returns its tokens."""
    rng = np.random.default_rng(seed)
    mu = np.log(C4_EN_MEAN_TOKENS) - LOG_SIGMA**2 / 2
    lengths_path, pointers_path = prefix + ".lengths.tmp", prefix + ".pointers.tmp"
    tokens = 0
    with open(lengths_path, "wb") as lf, open(pointers_path, "wb") as pf:
        for start in range(0, documents, CHUNK):
            n = min(CHUNK, documents - start)
            lengths = np.clip(rng.lognormal(mu, LOG_SIGMA, n), 1, 200_000).astype(np.int32)
            pointers = 2 * (tokens + np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]))
            lf.write(lengths.tobytes())
            pf.write(pointers.astype(np.int64).tobytes())
            tokens += int(lengths.sum(dtype=np.int64))
    with open(prefix + ".idx.tmp", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", documents) + struct.pack("<Q", documents + 1))
        for part in (lengths_path, pointers_path):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 64 << 20)
            os.remove(part)
        for start in range(0, documents + 1, CHUNK):
            f.write(np.arange(start, min(start + CHUNK, documents + 1), dtype=np.int64).tobytes())
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    with open(prefix + ".bin", "wb") as f:
        f.truncate(2 * tokens)  # sparse: no block is written
    return tokens


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _recipe_samples(seq_override=None) -> tuple[int, int]:
    from megatron_ext.planning.arguments import parse_run_config

    cfg = parse_run_config(["--config", RECIPE, "--mock-data"])
    return cfg.optim.train_iters * cfg.optim.global_batch_size, cfg.model.seq_length


def measure(prefix: str, mode: str, cache: str, samples: int, seq: int) -> dict:
    """One rank's data start, in this process: build (or find) the datasets, then read the
    first sample and one of the last epoch."""
    import torch  # noqa: F401 - the imports every rank has paid for before its data

    from megatron_ext.config.data import DataConfig
    from megatron_ext.data.datasets import build_datasets
    from megatron_ext.planning.preflight import check_dataset_files

    base = _rss_mb()
    t0 = time.perf_counter()
    check_dataset_files("--data-path", prefix)  # what every rank checks before its data
    checks_s = time.perf_counter() - t0
    data = DataConfig(data_path=[prefix], split="969,30,1", data_mode=mode, data_cache_path=cache)
    extra = {}
    if "say" in inspect.signature(build_datasets).parameters:  # absent before 2026-12-07
        extra["say"] = lambda line: print(line, file=sys.stderr)
    t0 = time.perf_counter()
    train, _, _ = build_datasets(
        data, seq_length=seq, seed=1234, vocab_size=32000, eod_id=1,
        num_samples=[samples, None, 0], **extra,
    )  # fmt: skip
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = train[0]
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    last = train[len(train) - 1]
    last_s = time.perf_counter() - t0
    assert first["tokens"].shape[0] == seq and last["tokens"].shape[0] == seq
    return {"checks_s": checks_s, "start_s": start_s, "first_sample_s": first_s,
            "last_epoch_sample_s": last_s,
            "peak_rss_mb": _rss_mb(), "data_rss_mb": _rss_mb() - base,
            "samples": len(train)}  # fmt: skip


def _child(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", args.prefix, args.mode,
           args.cache, str(args.samples), str(args.seq)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    sys.stderr.write("".join(f"    {line}\n" for line in proc.stderr.splitlines()
                             if line.startswith("data:")))  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_fraction(fraction: float, workdir: str, samples: int, seq: int) -> dict:
    documents = int(round(fraction * C4_EN_DOCUMENTS))
    folder = os.path.join(workdir, f"c4_{fraction:g}")
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "c4_text_document")
    t0 = time.perf_counter()
    if not os.path.isfile(prefix + ".idx"):
        write_dataset(prefix, documents)
    written_s = time.perf_counter() - t0
    result = {"fraction": fraction, "documents": documents, "samples": samples,
              "seq_length": seq, "idx_gb": os.path.getsize(prefix + ".idx") / 1e9,
              "write_s": written_s, "modes": {}}  # fmt: skip
    print(f"{fraction:g} of C4 en: {documents:,} documents, .idx {result['idx_gb']:.2f} GB "
          f"(written in {written_s:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    for mode in ("packed", "per-document"):
        cache = os.path.join(folder, f"cache_{mode}")
        shutil.rmtree(cache, ignore_errors=True)
        args = argparse.Namespace(prefix=prefix, mode=mode, cache=cache, samples=samples, seq=seq)
        cold = _child(args)  # builds the index where the mode has one
        warm = _child(args)  # finds it
        cache_gb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache)
                       for f in fs) / 1e9 if os.path.isdir(cache) else 0.0  # fmt: skip
        result["modes"][mode] = {"cold": cold, "cache_hit": warm, "cache_gb": cache_gb}
        print(f"  {mode}: file checks {warm['checks_s']:.2f} s, cold start {cold['start_s']:.1f} "
              f"s (peak RSS {cold['peak_rss_mb']:,.0f} MB), cache-hit start "
              f"{warm['start_s']:.2f} s, first sample "
              f"{warm['first_sample_s'] * 1e3:.1f} ms, last-epoch sample "
              f"{warm['last_epoch_sample_s'] * 1e3:.1f} ms, data RSS per rank "
              f"{warm['data_rss_mb']:,.0f} MB (peak {warm['peak_rss_mb']:,.0f} MB), cache "
              f"{cache_gb:.2f} GB", file=sys.stderr, flush=True)  # fmt: skip
        shutil.rmtree(cache, ignore_errors=True)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--measure":
        prefix, mode, cache, samples, seq = argv[1:]
        print(json.dumps(measure(prefix, mode, cache, int(samples), int(seq))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.02],
                   help="fractions of C4 en's documents (1.0: all 364.87M)")  # fmt: skip
    p.add_argument("--workdir", required=True, help="where the datasets are written (sparse)")
    p.add_argument("--samples", type=int, default=None,
                   help="training samples (default: the 7B recipe's iters × batch)")  # fmt: skip
    p.add_argument("--out", default=None, help="append the results as JSON lines here")
    p.add_argument("--keep", action="store_true", help="keep the datasets")
    args = p.parse_args(argv)
    samples, seq = _recipe_samples()
    samples = args.samples or samples
    for fraction in args.fraction:
        result = run_fraction(fraction, args.workdir, samples, seq)
        if args.out:
            from bench.process_stats import append_result

            append_result(args.out, result)
        print(json.dumps(result))
        if not args.keep:
            shutil.rmtree(os.path.join(args.workdir, f"c4_{fraction:g}"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
