"""Run a command as a child process and measure it: wall time and peak RSS of its process tree."""

from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Optional

import psutil


def run_measured(
    argv: list[str], cwd: Optional[str] = None, interval: float = 0.05
) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of the process and its children, stdout+stderr text).

    RSS is sampled every ``interval`` seconds; the output goes to a temporary file, so a chatty
    command cannot block on a full pipe. Raises RuntimeError (with the output) on failure.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(interval)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{output[-4000:]}")
    return seconds, peak, output


def append_result(path: str, result: dict) -> None:
    """One JSON line per run in ``bench/results/…jsonl``, stamped with the date and commit."""
    import datetime
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    stamped = {"date": datetime.date.today().isoformat(), "commit": commit or "unknown", **result}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(stamped) + "\n")
    print(f"appended to {os.path.relpath(path, root)}")
