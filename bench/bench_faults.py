#!/usr/bin/env python3
"""What the fault handling costs and how fast it recovers, on 2 CPU ranks under torchrun.

1. **The straggler report's cost**: a run with ``--log-straggler --log-interval 1`` (a report
   every step, the worst case); each report records its own time (``straggler_report_s``),
   compared with the step time of the same run.
2. **Recovery from a frozen rank**: ``torchrun --max-restarts 2 … --hang-timeout T``, rank 1
   frozen (SIGSTOP) at an iteration; the seconds from the freeze to the hang line, to the
   resume, and to the first new training step.

    python bench/bench_faults.py --hang-timeout 20

Results are printed and appended to ``bench/results/faults.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile

from fault_drills import ROOT, tiny_run_args, torchrun
from process_stats import append_result

from megatron_ext.metrics_file import MetricsFile

RESULTS = os.path.join(ROOT, "bench", "results", "faults.jsonl")


def straggler_cost(tmp: str, iters: int, model: str) -> dict:
    save = os.path.join(tmp, "straggler")
    args = tiny_run_args(save, iters=iters, log_straggler=True, model_size=model)
    launch = torchrun(args)
    assert launch.returncode == 0, launch.text[-3000:]
    records = MetricsFile.read(os.path.join(save, "metrics.jsonl")).records
    report = [r["straggler_report_s"] for r in records if "straggler_report_s" in r]
    step = [r["step_time_s"] for r in records if "step_time_s" in r][2:]  # past warm-up
    return {
        "model": model,
        "steps": len(step),
        "median_step_s": statistics.median(step),
        "median_report_s": statistics.median(report),
        "report_share_per_step": statistics.median(report) / statistics.median(step),
    }


def hang_recovery(tmp: str, hang_timeout: float, at_iteration: int) -> dict:
    save = os.path.join(tmp, "hang")
    args = tiny_run_args(save, iters=at_iteration + 8, save_interval=4, hang_timeout=hang_timeout)
    launch = torchrun(args, max_restarts=2, fault="freeze", at_iteration=at_iteration)
    assert launch.returncode == 0, launch.text[-3000:]
    e = launch.events
    hang_line = next(line for line in launch.lines if line.startswith("hang: "))  # the first
    stalled = float(re.search(r"no progress for (\d+) s", hang_line).group(1))
    return {
        "hang_timeout_s": hang_timeout,
        "hang_line": hang_line.strip(),
        "reported_stall_s": stalled,
        "freeze_to_resumed_s": e["resumed"] - e["fault"],
        "freeze_to_first_new_step_s": e["first_new_step"] - e["fault"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hang-timeout", type=float, default=20.0)
    p.add_argument("--iters", type=int, default=60, help="steps of the straggler-cost run")
    p.add_argument("--model-size", default="tiny", help="model of the straggler-cost run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cost = straggler_cost(tmp, args.iters, args.model_size)
        print(
            f"straggler report ({cost['model']}, 2 ranks, a report every step): "
            f"{cost['median_report_s'] * 1e3:.2f} ms per report, step "
            f"{cost['median_step_s'] * 1e3:.1f} ms: {100 * cost['report_share_per_step']:.2f}% "
            "of a step at --log-interval 1"
        )
        recovery = hang_recovery(tmp, args.hang_timeout, at_iteration=6)
        print(recovery["hang_line"])
        print(
            f"frozen rank, --hang-timeout {args.hang_timeout:g}: resumed "
            f"{recovery['freeze_to_resumed_s']:.1f} s after the freeze, first new step after "
            f"{recovery['freeze_to_first_new_step_s']:.1f} s"
        )
    append_result(RESULTS, {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "straggler": cost,
        "hang": recovery,
    })  # fmt: skip


if __name__ == "__main__":
    main()
