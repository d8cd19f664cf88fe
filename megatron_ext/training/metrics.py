"""The run's metrics sinks: a JSONL metrics file (always), W&B (when installed; offline without
credentials) and TensorBoard (optional)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

logger = logging.getLogger("gpas")


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8").read()


class MetricsWriter:
    """Writes metrics on the logging rank only; other ranks get a no-op writer."""

    def __init__(
        self,
        path: str,
        enabled: bool,
        *,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        wandb_name: Optional[str] = None,
        wandb_run_id: Optional[str] = None,
        config: Optional[dict] = None,
    ):
        self.enabled = enabled
        self.path = path
        self.wandb_run_id = wandb_run_id
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if _ends_mid_line(path):  # a run killed while writing: its cut line stays on its own
            self._file.write("\n")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError as err:  # RunConfig.validate refuses this before training
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
                ) from err
        if wandb_project:
            self._start_wandb(wandb_project, wandb_name, wandb_run_id, config)

    def _start_wandb(self, project, name, run_id, config) -> None:
        try:
            import wandb
        except ImportError as err:  # RunConfig.validate refuses this before training
            raise RuntimeError(
                "--wandb-project needs the wandb package: pip install wandb"
            ) from err
        mode = "online" if _wandb_credentials() else "offline"
        run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            mode=mode,
            dir=os.path.dirname(os.path.abspath(self.path)),  # W&B's files beside the metrics
        )
        self.wandb_run_id = run.id
        self._wandb = run
        where = (
            f"; upload with: wandb sync {run.dir.rsplit('/files', 1)[0]}"
            if mode == "offline"
            else ""
        )
        verb = "resumed" if run_id else "started"
        logger.info("W&B run %s %s (%s)%s", run.id, verb, mode, where)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        step = record.get("iteration")
        scalars = {
            k: v
            for k, v in _flatten(record).items()
            if isinstance(v, (int, float)) and k not in ("iteration", "time")
        }
        if self._tb is not None and step is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink (again: nothing)."""
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None


def _ends_mid_line(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _flatten(record: dict, prefix: str = "") -> dict:
    """Scalars for TensorBoard/W&B: nested dicts as ``a/b``; per-layer lists as
    ``name/layer_01`` (numbers, e.g. the GPAS scales) or ``name/layer_01/field`` (telemetry
    rows, keyed by their ``layer``)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    layer = item.get("layer", i)
                    rest = {k: v for k, v in item.items() if k != "layer"}
                    out.update(_flatten(rest, f"{name}/layer_{layer + 1:02d}/"))
                else:
                    out[f"{name}/layer_{i + 1:02d}"] = item
        else:
            out[name] = value
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
