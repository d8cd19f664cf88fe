"""Preprocessing throughput against the raw tokenizer, and peak memory against input size.

Input: ../shared/data/corpus (real English text in C4's schema) repeated into gzip shards until
it holds ≥ --min-mb of text. For 1 and 2 workers it measures, in the same run:

* raw: SentencePiece encoding the same texts, already in memory, with the same number of
  processes (loading is not timed);
* ours: the whole ``tools/preprocess_data.py`` process (start-up, decompression, JSON parsing,
  tokenization, writing, merge), wall time and peak RSS of its process tree.

The ratio raw_time / our_time is the fraction of raw tokenizer throughput we keep (target ≥ 0.95).
Then peak memory at 1× and 4× the input (target: flat).

    python bench/bench_preprocess.py [--min-mb 100] [--tokenizer PATH.model]
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# process_stats.py lies beside this script (its directory is first on sys.path)
from process_stats import run_measured  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def make_input(directory: str, min_mb: float) -> tuple[list[str], float]:
    sources = sorted(
        os.path.join(SHARED, "corpus", f)
        for f in os.listdir(os.path.join(SHARED, "corpus"))
        if f.startswith("corpus-train")
    )
    texts_mb, files, copy = 0.0, [], 0
    while texts_mb < min_mb:
        for src in sources:
            dst = os.path.join(directory, f"copy{copy:03d}-{os.path.basename(src)}")
            shutil.copyfile(src, dst)
            files.append(dst)
            with gzip.open(src, "rt", encoding="utf-8") as f:
                texts_mb += sum(len(json.loads(line)["text"].encode()) for line in f) / 1e6
        copy += 1
    return files, texts_mb


_texts: list = []
_sp = None


def _load(files, model):
    import sentencepiece as spm

    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model)
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            _texts.extend(json.loads(line)["text"] for line in f)


def _encode(_):
    start = time.perf_counter()
    n = sum(len(ids) for ids in _sp.encode(_texts, num_threads=1))
    return n, time.perf_counter() - start


def raw_tokenizer_seconds(files, model, processes: int) -> tuple[float, int]:
    """Wall time of `processes` processes encoding their share of the texts, all in memory."""
    ctx = mp.get_context("spawn")
    shares = [files[i::processes] for i in range(processes)]
    pools = [ctx.Pool(1, initializer=_load, initargs=(share, model)) for share in shares]
    for pool in pools:
        pool.apply(len, ([],))  # wait until loaded
    start = time.perf_counter()
    results = [pool.apply_async(_encode, (None,)) for pool in pools]
    tokens = sum(r.get()[0] for r in results)
    seconds = time.perf_counter() - start
    for pool in pools:
        pool.close()
        pool.join()
    return seconds, tokens


def ours(files, model, workers: int, out_dir: str) -> tuple[float, float, str]:
    """Wall time and peak RSS (MB, whole process tree) of the preprocessing tool."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "preprocess_data.py"),
        "--input",
        *files,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--append-eod",
        "--output-prefix",
        os.path.join(out_dir, "corpus"),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    seconds, peak, output = run_measured(cmd)
    return seconds, peak / 1e6, output.strip().splitlines()[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-mb", type=float, default=100.0)
    p.add_argument(
        "--tokenizer", default=os.path.join(SHARED, "tokenizers", "mistral-v1-bpe32k.model")
    )
    p.add_argument("--memory-scale", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "in1"))
        files, mb = make_input(os.path.join(tmp, "in1"), args.min_mb)
        print(f"input: {len(files)} gzip shards, {mb:.1f} MB of text; tokenizer {args.tokenizer}")
        for workers in (1, 2):
            raw_s, raw_tokens = raw_tokenizer_seconds(files, args.tokenizer, workers)
            our_s, rss, line = ours(files, args.tokenizer, workers, os.path.join(tmp, "out"))
            print(
                f"workers={workers}: raw tokenizer {raw_s:.1f} s ({mb / raw_s:.2f} MB/s), "
                f"ours {our_s:.1f} s ({mb / our_s:.2f} MB/s) → ratio {raw_s / our_s:.3f}; "
                f"peak RSS {rss:.0f} MB\n    {line}"
            )
        big = [f for _ in range(args.memory_scale) for f in files]
        big_dir = os.path.join(tmp, "in4")
        os.makedirs(big_dir)
        big_files = []
        for i, f in enumerate(big):
            dst = os.path.join(big_dir, f"rep{i // len(files)}-{os.path.basename(f)}")
            os.link(f, dst)
            big_files.append(dst)
        s1, rss1, _ = ours(files, args.tokenizer, 2, os.path.join(tmp, "out"))
        s4, rss4, _ = ours(big_files, args.tokenizer, 2, os.path.join(tmp, "out"))
        print(
            f"peak RSS, 2 workers: {rss1:.0f} MB at 1× ({mb:.0f} MB), {rss4:.0f} MB at "
            f"{args.memory_scale}× → ratio {rss4 / rss1:.3f} (times {s1:.1f} s, {s4:.1f} s)"
        )


if __name__ == "__main__":
    main()
