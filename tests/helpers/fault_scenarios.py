"""Faults injected from inside the workers (a ``sitecustomize`` for ``bench/fault_drills.py``'s
``torchrun``): a rank stuck in a collective during a checkpoint save, a slow start."""

# Workers started with this on PYTHONPATH: in its checkpoint save of iteration 8, rank 1 of the
# first attempt waits for a message rank 0 never sends (rank 0 then waits for rank 1 in the
# save's first collective): both are stuck in communication, neither can interrupt it.
STALL_IN_SAVE = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    from megatron_ext.training.components import checkpointer

    _save = checkpointer.Checkpointer._save

    def _stalled_save(self, state):
        import torch

        if state.iteration == 8:
            torch.distributed.recv(torch.zeros(1), src=0, tag=4242)
        _save(self, state)

    checkpointer.Checkpointer._save = _stalled_save
"""


# Workers started with this on PYTHONPATH start slowly, as a 7B run on all of C4 does: rank 0's
# data build takes SLOW_START_S (the others wait for it in the next collective), and every
# rank's first step takes SLOW_START_S more (something built lazily).
SLOW_START_S = 12
SLOW_START = f"""
import os
import time

from megatron_ext.training import trainer

_RunData = trainer.RunData
_train_step = trainer.train_step
_first = [True]


class _SlowRunData(_RunData):
    def __init__(self, *args, **kwargs):
        if os.environ.get("RANK") == "0":
            time.sleep({SLOW_START_S})
        super().__init__(*args, **kwargs)


def _slow_first_step(*args, **kwargs):
    if _first[0]:
        _first[0] = False
        time.sleep({SLOW_START_S})
    return _train_step(*args, **kwargs)


trainer.RunData = _SlowRunData
trainer.train_step = _slow_first_step
"""
