"""Read an offline W&B run file (``run-<id>.wandb``) back: the file is W&B's record log
(LevelDB's log format after a 7-byte header) of ``wandb_internal_pb2.Record`` messages."""

from __future__ import annotations

import glob
import json
import os
import struct

_BLOCK = 32768
_HEADER = 7  # ":W&B", a 2-byte magic, a 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def read_run(path: str) -> dict:
    """{"run_id": id, "history": {step: {key: value}}} of one .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    run_id, history = None, {}
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            step = record.history.step.num
            history.setdefault(step, {}).update(row)
    return {"run_id": run_id, "history": history}


def offline_runs(directory: str) -> list[dict]:
    """Every offline run under ``directory``/wandb, oldest first."""
    files = sorted(glob.glob(os.path.join(directory, "wandb", "offline-run-*", "run-*.wandb")))
    return [read_run(f) for f in files]
