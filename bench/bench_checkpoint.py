#!/usr/bin/env python3
"""What trustworthy checkpoints cost, measured side by side in one run.

1. **The manifest** on ``--gigabytes`` of checkpoint-like files (8 shards of random bytes):
   sizes only (a ``stat`` per file) against SHA-256, on write and on verify, by one process, and
   the time it extrapolates to for a 7B checkpoint shared by N ranks.
2. **The training stall per save**, sync against ``--async-save``: the training CLI on a model
   whose checkpoint takes seconds to write, saving every ``--save-interval`` steps; the stall is
   the time a save holds training (the ``saved checkpoint … in`` line for a sync save, the
   ``training held`` line for an async one).

    python bench/bench_checkpoint.py --gigabytes 1
    python bench/bench_checkpoint.py --skip-manifest     # the stall only

Results are printed and appended to ``bench/results/checkpoint.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from process_stats import append_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "checkpoint.jsonl")

# 7B (the 7b preset, bf16 with the distributed optimizer): bf16 weights, fp32 main copy and two
# fp32 Adam moments per parameter, as ``estimate_checkpoint_bytes`` counts them.
PARAMS_7B = 6.74e9
BYTES_7B = PARAMS_7B * (2 + 12)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - t0, value


def bench_manifest(gigabytes: float, workdir: str) -> dict:
    from megatron_ext.checkpoint import manifest as m

    directory = os.path.join(workdir, "iter_0000100")
    os.makedirs(directory)
    shard = int(gigabytes * 2**30) // 8
    block = os.urandom(1 << 20)
    for i in range(8):
        with open(os.path.join(directory, f"__{i}_0.distcp"), "wb") as f:
            for _ in range(shard >> 20):
                f.write(block)
    files = m.list_files(directory)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    sizes_s, _ = _timed(m.describe, directory, files, hashed=False)
    hash_s, entries = _timed(m.describe, directory, files, hashed=True)
    manifest = m.write(directory, entries, hashed=True, iteration=100)
    verify_sizes_s, problems = _timed(m.size_problems, directory, manifest)
    verify_hash_s, bad = _timed(m.hash_problems, directory, manifest, files)
    assert not problems and not bad
    rate = total / hash_s
    return {
        "bytes": total,
        "write_sizes_only_s": sizes_s,
        "write_sha256_s": hash_s,
        "verify_sizes_only_s": verify_sizes_s,
        "verify_sha256_s": verify_hash_s,
        "sha256_bytes_per_s": rate,
        "note": "files just written (page cache warm), one process",
        "extrapolated_7b_s": {
            str(ranks): BYTES_7B / ranks / rate for ranks in (8, 64, 512)
        },  # fmt: skip
    }


MODEL = ["--num-layers", "8", "--hidden-size", "512", "--ffn-hidden-size", "1408",
         "--num-attention-heads", "8", "--vocab-size", "32000", "--seq-length", "128"]  # fmt: skip


def _train(save: str, iters: int, interval: int, async_save: bool) -> str:
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpas.py"), "--device", "cpu", *MODEL,
            "--norm-type", "pre_gpas", "--mock-data", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--train-iters", str(iters), "--lr", "1e-4",
            "--log-interval", "1", "--eval-interval", str(iters * 10), "--eval-iters", "1",
            "--num-workers", "0", "--save", save, "--save-interval", str(interval)]  # fmt: skip
    if async_save:
        argv.append("--async-save")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def bench_stall(iters: int, interval: int, workdir: str) -> dict:
    out = {}
    for mode in ("sync", "async"):
        save = os.path.join(workdir, mode)
        log = _train(save, iters, interval, async_save=mode == "async")
        written = [float(x) for x in re.findall(r"saved checkpoint \S+ in ([\d.]+) s", log)]
        if mode == "sync":
            stalls = written
        else:  # handing the tensors over, then the manifest and rename once written
            held = [float(x) for x in re.findall(r"training held ([\d.]+) s", log)]
            final = [float(x) for x in re.findall(r"finalizing held training ([\d.]+) s", log)]
            stalls = [a + b for a, b in zip(held, final, strict=True)]
        steps = [float(x) for x in re.findall(r"\| ([\d.]+) ms/it", log)]
        size = re.findall(r"saved checkpoint \S+ in [\d.]+ s \(([^;)]+)", log)
        out[mode] = {
            "saves": len(stalls),
            "stall_s": stalls,
            "stall_median_s": statistics.median(stalls[1:] or stalls),  # the first one warms up
            "write_s": written,
            "median_step_ms": statistics.median(steps),
            "checkpoint_size": size[-1] if size else None,
        }
        shutil.rmtree(save, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gigabytes", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--skip-manifest", action="store_true")
    p.add_argument("--skip-stall", action="store_true")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        if not args.skip_manifest:
            m = result["manifest"] = bench_manifest(args.gigabytes, workdir)
            print(f"manifest on {m['bytes'] / 2**30:.2f} GiB (8 files), one process:")
            print(f"  write: sizes only {m['write_sizes_only_s'] * 1e3:.2f} ms, "
                  f"SHA-256 {m['write_sha256_s']:.2f} s ({m['sha256_bytes_per_s'] / 2**30:.2f} "
                  "GiB/s)")  # fmt: skip
            print(f"  verify: sizes only {m['verify_sizes_only_s'] * 1e3:.2f} ms, "
                  f"SHA-256 {m['verify_sha256_s']:.2f} s")  # fmt: skip
            for ranks, s in m["extrapolated_7b_s"].items():
                print(f"  7B checkpoint ({BYTES_7B / 1e9:.0f} GB) hashed by {ranks} ranks: "
                      f"≈{s:.1f} s per save")  # fmt: skip
        if not args.skip_stall:
            s = result["stall"] = bench_stall(args.iters, args.save_interval, workdir)
            print(f"training stall per save ({s['sync']['checkpoint_size']} checkpoint, "
                  f"{s['sync']['saves']} saves):")  # fmt: skip
            for mode in ("sync", "async"):
                r = s[mode]
                print(f"  {mode:5s}: median {r['stall_median_s']:.2f} s held "
                      f"(each: {', '.join(f'{x:.2f}' for x in r['stall_s'])}); "
                      f"median step {r['median_step_ms']:.0f} ms")  # fmt: skip
    append_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
