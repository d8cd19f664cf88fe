#!/usr/bin/env python3
"""What the fault handling costs and how fast it recovers, under torchrun (2 CPU ranks by
default).

1. **The straggler report's cost** (``straggler``): a run with ``--log-straggler
   --log-interval 1`` (a report every step, the worst case); each report records its own time
   (``straggler_report_s``), compared with the step time of the same run.
2. **Recovery from a frozen rank** (``hang``): ``torchrun --max-restarts 2 … --hang-timeout T``,
   the last rank frozen (SIGSTOP) at an iteration; the seconds from the freeze to the hang line,
   to the resume, and to the first new training step. With ``--calc-ft-timeouts`` the run
   learns its timeouts at each save (an all-reduce on the run's device: NCCL with
   ``--device cuda``) and the restarted run starts from them.

    python bench/bench_faults.py --hang-timeout 20
    python bench/bench_faults.py --device cuda --nproc 1 --parts hang --calc-ft-timeouts

Results are printed and appended to ``bench/results/faults.jsonl`` (``--json``).
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


def straggler_cost(tmp: str, iters: int, model: str, device: str, nproc: int) -> dict:
    save = os.path.join(tmp, "straggler")
    args = tiny_run_args(save, iters=iters, log_straggler=True, model_size=model, device=device)
    launch = torchrun(args, nproc=nproc)
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


def hang_recovery(
    tmp: str, hang_timeout: float, at_iteration: int, device: str, nproc: int, learn: bool
) -> dict:
    save = os.path.join(tmp, "hang")
    flags = {"save_interval": 4, "hang_timeout": hang_timeout}
    if learn:
        flags["calc_ft_timeouts"] = True
    args = tiny_run_args(save, iters=at_iteration + 8, device=device, **flags)
    launch = torchrun(args, nproc=nproc, max_restarts=2, fault="freeze",
                      at_iteration=at_iteration, fault_rank=nproc - 1)  # fmt: skip
    assert launch.returncode == 0, launch.text[-3000:]
    e = launch.events
    hang_line = next(line for line in launch.lines if line.startswith("hang: "))  # the first
    stalled = float(re.search(r"no progress for (\d+) s", hang_line).group(1))
    result = {
        "device": device,
        "ranks": nproc,
        "hang_timeout_s": hang_timeout,
        "hang_line": hang_line.strip(),
        "reported_stall_s": stalled,
        "freeze_to_resumed_s": e["resumed"] - e["fault"],
        "freeze_to_first_new_step_s": e["first_new_step"] - e["fault"],
    }
    if learn:
        learned = re.findall(r"hang timeouts learned: (.*)", launch.text)
        reloaded = re.findall(r"hang timeouts learned by the run before: (.*)", launch.text)
        assert learned and reloaded, f"no learned timeouts, or none reloaded: {launch.text[-3000:]}"
        result.update(learned=learned[0].strip(), reloaded=reloaded[0].strip())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--nproc", type=int, default=2, help="ranks (one GPU each with --device cuda)")
    p.add_argument("--parts", default="straggler,hang", help="straggler, hang, or both")
    p.add_argument("--hang-timeout", type=float, default=20.0)
    p.add_argument("--calc-ft-timeouts", action="store_true", help="the hang run learns them")
    p.add_argument("--iters", type=int, default=60, help="steps of the straggler-cost run")
    p.add_argument("--model-size", default="tiny", help="model of the straggler-cost run")
    p.add_argument("--json", default=RESULTS, help="the results file (appended)")
    args = p.parse_args()
    parts = args.parts.split(",")
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        if "straggler" in parts:
            cost = straggler_cost(tmp, args.iters, args.model_size, args.device, args.nproc)
            print(
                f"straggler report ({cost['model']}, {args.nproc} ranks, a report every step): "
                f"{cost['median_report_s'] * 1e3:.2f} ms per report, step "
                f"{cost['median_step_s'] * 1e3:.1f} ms: "
                f"{100 * cost['report_share_per_step']:.2f}% of a step at --log-interval 1"
            )
            result["straggler"] = cost
        if "hang" in parts:
            recovery = hang_recovery(tmp, args.hang_timeout, 6, args.device, args.nproc,
                                     args.calc_ft_timeouts)  # fmt: skip
            print(recovery["hang_line"])
            print(
                f"frozen rank ({args.device}, {args.nproc} ranks), --hang-timeout "
                f"{args.hang_timeout:g}: resumed {recovery['freeze_to_resumed_s']:.1f} s after "
                f"the freeze, first new step after {recovery['freeze_to_first_new_step_s']:.1f} s"
            )
            if args.calc_ft_timeouts:
                print(f"learned at the first save: {recovery['learned']}; the restarted run "
                      f"started from: {recovery['reloaded']}")  # fmt: skip
            result["hang"] = recovery
    append_result(args.json, result)


if __name__ == "__main__":
    main()
