"""The small collectives every room agrees through, on two gloo ranks: rank 0's decision
reaches every rank, a decision that fails on rank 0 fails on every rank (none waits for a
broadcast that never comes), and a flag raised on one rank is seen by all."""

import torch

from tests.helpers.dist_workers import run_ranks


def _collectives_worker():
    from megatron_ext.platform import collectives as c

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    out = {"decided": c.decided_by_rank0(lambda: {"rank": torch.distributed.get_rank()})}

    def fails():
        raise OSError("disk gone")

    try:
        c.decided_by_rank0(fails)
    except Exception as err:  # noqa: BLE001 - the kind and text are the result
        out["failure"] = (type(err).__name__, str(err))
    out["any"] = c.any_rank(rank == 1), c.any_rank(False)
    torch.distributed.destroy_process_group()
    return out


def test_rank0_decides_for_all_and_its_failure_reaches_every_rank(tmp_path):
    results = run_ranks(_collectives_worker, 2, (), tmp_path)
    assert [r["decided"] for r in results] == [{"rank": 0}, {"rank": 0}]
    assert results[0]["failure"] == ("OSError", "disk gone")
    assert results[1]["failure"] == ("RuntimeError", "rank 0 failed to decide: disk gone")
    assert [r["any"] for r in results] == [(True, False), (True, False)]
