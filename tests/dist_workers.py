"""Helpers shared by the multi-process tests: launch ranks, build a layout, train a few steps."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_ext.platform.distributed import free_port


def _entry(rank, world_size, port, fn, args, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = fn(*args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(fn, world_size: int, args, tmp_path) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; return each rank's result."""
    result_dir = str(tmp_path / f"ranks_{fn.__name__}_{free_port()}")
    os.makedirs(result_dir)
    try:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, result_dir),
                           nprocs=world_size, join=True, start_method="spawn")
    except Exception as err:
        errors = [open(os.path.join(result_dir, f)).read()
                  for f in sorted(os.listdir(result_dir)) if f.endswith(".err")]
        raise AssertionError("rank failed:\n" + "\n".join(errors)) from err
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)]


def synthetic_batches(seed: int, num_batches: int, global_batch: int, seq_length: int,
                      vocab: int, pad_fraction: float = 0.2):
    """Deterministic global batches with right padding (loss mask 0 on pads)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        tokens = torch.randint(0, vocab, (global_batch, seq_length + 1), generator=gen)
        lengths = torch.randint(int(seq_length * (1 - pad_fraction)), seq_length + 1,
                                (global_batch,), generator=gen)
        mask = (torch.arange(seq_length)[None, :] < lengths[:, None]).float()
        batches.append(dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                            loss_mask=mask))
    return batches


def micro_batches(global_batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int):
    """Split a global batch into this DP rank's micro-batches (contiguous slice per rank)."""
    n = global_batch["tokens"].shape[0]
    per_rank = n // dp_size
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch_size):
        mb = {k: v[start:start + micro_batch_size] for k, v in global_batch.items()}
        seq = mb["tokens"].shape[1]
        mb["position_ids"] = torch.arange(seq).unsqueeze(0).expand(micro_batch_size, -1)
        out.append(mb)
    return out
