"""Read a run's metrics.jsonl (written by pretrain_gpas.py) into curves."""

from __future__ import annotations

import json


class MetricsFileError(ValueError):
    """A metrics file that is not JSON lines; the message names the file and line."""


def read_metrics(path: str, *, tolerate_last_line: bool = False) -> dict:
    """{"train": [(iteration, loss)], "valid": [(iteration, loss)], "telemetry": [(it, rows)]}.

    A resumed run repeats the iterations after its last checkpoint; the later record wins.
    ``tolerate_last_line`` skips a final line cut short (a run killed while writing).
    """
    train, valid, telemetry = {}, {}, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as err:
            if tolerate_last_line and number == len(lines):
                break
            raise MetricsFileError(f"{path}:{number}: not a JSON line ({err})") from err
        if record.get("lm_loss") is not None:
            train[record["iteration"]] = record["lm_loss"]
        if record.get("val_loss") is not None:
            valid[record["iteration"]] = record["val_loss"]
        if record.get("telemetry"):
            telemetry.append((record["iteration"], record["telemetry"]))
    return {
        "train": sorted(train.items()),
        "valid": sorted(valid.items()),
        "telemetry": telemetry,
    }
