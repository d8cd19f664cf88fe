"""Hugging Face export cost for a 1b-preset checkpoint: time and peak memory against the size
of the checkpoint on disk and against a plain file copy of it, measured side by side.

1. A random 1b-preset model (pre_gpas, gates away from 0) is saved as a weights-only
   torch_dist checkpoint (skipped when --workdir already holds one).
2. ``cp -r`` of the checkpoint directory: wall time and peak RSS.
3. ``tools/convert_to_hf.py`` for --target llama and --target gpas: wall time and peak RSS of
   the whole process (Python, torch and transformers imports included; their idle RSS is
   measured separately and reported).

    python bench/bench_convert.py [--preset 1b] [--dtype bfloat16] [--workdir /tmp/bench_convert]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# process_stats.py lies beside this script (its directory is first on sys.path)
from process_stats import run_measured  # noqa: E402


def _make_checkpoint(preset: str, dtype_name: str, root: str) -> None:
    import torch

    from megatron_ext.checkpoint.save_load import save_checkpoint
    from megatron_ext.export.megatron_model import build_cpu_model
    from megatron_ext.models.presets import model_preset

    cfg = model_preset(preset, norm_type="pre_gpas")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    model = build_cpu_model(cfg, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gpas_gate"):
                p.fill_(0.05)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
    save_checkpoint(root, 1, [model], None, None, {"config": {"model": dataclasses.asdict(cfg)}})


def _measure(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a child process, RSS sampled every 20 ms."""
    seconds, peak, _ = run_measured(argv, cwd=ROOT, interval=0.02)
    return seconds, peak


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "convert.jsonl"))
    args = p.parse_args()
    ckpt = os.path.join(args.workdir, f"{args.preset}_{args.dtype}")
    if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        t0 = time.perf_counter()
        # in a child process, so that this one stays small
        call = f"_make_checkpoint({args.preset!r}, {args.dtype!r}, {ckpt!r})"
        make = f"from bench.bench_convert import _make_checkpoint; {call}"
        subprocess.run([sys.executable, "-c", make], cwd=ROOT, check=True)
        print(f"made the checkpoint in {time.perf_counter() - t0:.0f} s")
    size = _dir_bytes(ckpt)
    copy = os.path.join(args.workdir, "copy")
    shutil.rmtree(copy, ignore_errors=True)
    copy_s, copy_rss = _measure(["cp", "-r", ckpt, copy])
    shutil.rmtree(copy, ignore_errors=True)
    idle_s, idle_rss = _measure(
        [sys.executable, "-c", "import megatron_ext.export.to_hf, transformers, safetensors"]
    )
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores",
        "preset": args.preset,
        "dtype": args.dtype,
        "checkpoint_gb": size / 1e9,
        "copy_s": copy_s,
        "imports_rss_gb": idle_rss / 1e9,
    }
    print(
        f"checkpoint {size / 1e9:.2f} GB; cp -r {copy_s:.1f} s; "
        f"imports alone {idle_rss / 1e9:.2f} GB RSS"
    )
    for target, shard in (("llama", "5GB"), ("gpas", "5GB"), ("gpas", "500MB")):
        out = os.path.join(args.workdir, f"hf_{target}")
        wall, rss = _measure(
            [
                sys.executable,
                "tools/convert_to_hf.py",
                "--load",
                ckpt,
                "--output",
                out,
                "--target",
                target,
                "--overwrite",
                "--max-shard-size",
                shard,
            ]
        )
        exported = _dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        record[f"{target}_{shard}"] = {
            "seconds": wall,
            "peak_rss_gb": rss / 1e9,
            "export_gb": exported / 1e9,
            "time_vs_copy": wall / copy_s,
            "rss_vs_checkpoint": rss / size,
            "rss_above_imports_vs_checkpoint": (rss - idle_rss) / size,
        }
        print(
            f"{target:5s} shards ≤ {shard:5s}: {wall:.1f} s ({wall / copy_s:.2f}× cp), "
            f"peak RSS {rss / 1e9:.2f} GB "
            f"({rss / size:.2f}× checkpoint; {(rss - idle_rss) / size:.2f}× above imports), "
            f"export {exported / 1e9:.2f} GB"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
