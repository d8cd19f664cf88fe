"""How often a training step reads the device from the host. On a GPU each read (``.item()``,
``.tolist()``, a tensor's ``bool``/``float``/``int``, an object collective) waits for every
queued kernel, so the host cannot queue the next ones ahead: a single-GPU step must read only
what it needs, its loss with the token count and its gradient norm. Counted on CPU by wrapping
the reading methods of ``torch.Tensor`` in the rank's process."""

import collections
import os
import traceback

from tests.helpers.cli_runs import base_args
from tests.helpers.dist_workers import run_ranks

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object")


def _reader_site() -> str:
    """``file:line`` of the innermost frame in the project, megatron-core or torch.optim."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(part in frame.filename for part in ("/megatron_ext/", "/megatron/core/", "/optim/")):
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "elsewhere"


def _count_reads(save):
    import torch

    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.contract import Component
    from megatron_ext.training.trainer import run

    window = {"iteration": None, "reading": False}
    reads = collections.defaultdict(collections.Counter)

    def counted(owner, name):
        original = getattr(owner, name)

        def read(*args, **kwargs):
            if window["reading"]:  # the CPU emulation's torch-function mode calls it again
                return original(*args, **kwargs)
            if window["iteration"] is not None:
                reads[window["iteration"]][f"{name} at {_reader_site()}"] += 1
            window["reading"] = True
            try:
                return original(*args, **kwargs)
            finally:
                window["reading"] = False

        setattr(owner, name, read)

    for name in READS:
        counted(torch.Tensor, name)
    for name in OBJECT_COLLECTIVES:
        counted(torch.distributed, name)

    class Window(Component):
        """From one step's start to the next one's: the components' hooks after it included."""

        def before_step(self, iteration):
            window["iteration"] = iteration

        def at_end(self, state, stopped):
            window["iteration"] = None

    # no log, evaluation or save step among 2-3; no gate clip (it reads its norm); torch's fused
    # Adam, as on a GPU (the loop over parameters reads each one's step count)
    args = base_args(save, iters=4, log_interval=100, clip_gate_grad=0.0, use_fused_adam=True)
    run(parse_run_config(args), components=[Window()])
    return {i: dict(reads[i]) for i in (2, 3)}


def test_a_single_rank_step_reads_the_device_twice(tmp_path):
    (reads,) = run_ranks(_count_reads, 1, (str(tmp_path / "run"),), tmp_path)
    for iteration, sites in reads.items():
        assert sum(sites.values()) == 2, (iteration, sites)
        assert sorted(s.split(":")[0] for s in sites) == [
            "item at clip_grads.py",  # megatron-core's gradient norm
            "tolist at step.py",  # the loss and its token count
        ], (iteration, sites)
