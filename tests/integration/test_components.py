"""The component contract end to end: a component with sharded state, registered from outside
the trainer, survives save → resume exactly under TP 2 and PP 2; a component sees the phases
that are not steps; a checkpoint written in the older run-state layout still resumes."""

import dataclasses
import os
import shutil

import pytest
import torch

from megatron_ext.training.contract import Component
from tests.helpers import ROOT
from tests.helpers.cli_runs import base_args
from tests.helpers.dist_workers import run_ranks

FIXTURE = os.path.join(ROOT, "tests", "data", "checkpoints", "before_components")


class ParamRunningMean(Component):
    """A toy component with sharded state: the running mean, over steps, of the word
    embeddings (split over TP ranks by vocabulary rows; on the first pipeline stage only). Its
    checkpoint entry reuses the parameter's own sharded metadata, so it is split and resharded
    as the weight is."""

    state_key = "param_mean"

    def __init__(self, ctx):
        from megatron_ext.models.gpt import unwrap_model

        self.param, self.sharded, self.mean = None, None, None
        for chunk in ctx.model:
            model = unwrap_model(chunk)
            if getattr(model, "pre_process", False):  # the stage with the embeddings
                self.param = model.embedding.word_embeddings.weight
                (self.sharded,) = [
                    sh
                    for sh in model.sharded_state_dict().values()
                    if getattr(sh, "key", None) == "embedding.word_embeddings.weight"
                ]
                self.mean = torch.zeros_like(self.param, dtype=torch.float64)
        self.count = 0

    def after_step(self, step):
        self.count += 1
        if self.mean is not None:
            self.mean += (self.param.detach().float() - self.mean) / self.count
        step.record_metric("param_mean_steps", self.count)  # reaches the metrics file

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def sharded_state_dict(self):
        if self.mean is None:
            return {}
        return {"mean": dataclasses.replace(self.sharded, data=self.mean, dtype=self.mean.dtype)}

    def load_sharded_state_dict(self, state):
        self.mean.copy_(state["mean"])


def _train(save, layout, iters, **extra):
    """One run on this rank; its losses and the toy component's count and local mean."""
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import run
    from tests.helpers.cli_runs import losses

    args = base_args(save, iters=iters, **layout, **extra)
    toys = []

    def toy(ctx):
        toys.append(ParamRunningMean(ctx))
        return toys[0]

    run(parse_run_config(args), components=[toy])
    (c,) = toys
    logging_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    metrics = os.path.join(save, "metrics.jsonl")
    return {
        "losses": losses(metrics) if logging_rank else None,
        "recorded": _recorded(metrics, "param_mean_steps") if logging_rank else None,
        "count": c.count,
        "mean": None if c.mean is None else c.mean.clone(),
    }


def _recorded(metrics_path, name) -> dict:
    from megatron_ext.metrics_file import MetricsFile

    return {r["iteration"]: r[name] for r in MetricsFile.read(metrics_path).records if name in r}


LAYOUTS = {
    "tp2": {"tensor_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_component_with_sharded_state_resumes_exactly(tmp_path, layout):
    flags = LAYOUTS[layout]
    whole = run_ranks(_train, 2, (str(tmp_path / "whole"), flags, 4), tmp_path)
    split = str(tmp_path / "split")
    run_ranks(_train, 2, (split, flags, 4), tmp_path, {"exit_interval": 2})
    resumed = run_ranks(_train, 2, (split, flags, 4), tmp_path)
    for rank, (a, b) in enumerate(zip(whole, resumed, strict=True)):
        assert b["count"] == a["count"] == 4, rank  # the replicated half came back
        if a["mean"] is None:  # a pipeline stage without layer 1 holds none of the state
            assert layout == "pp2" and b["mean"] is None
            continue
        assert torch.equal(a["mean"], b["mean"]), rank  # the sharded half, exactly
    holders = [r for r in whole if r["mean"] is not None]
    assert len(holders) == 2 if layout == "tp2" else len(holders) == 1
    if layout == "tp2":  # each rank holds its own half of the weight's running mean
        assert not torch.equal(holders[0]["mean"], holders[1]["mean"])
    assert whole[-1]["losses"] == resumed[-1]["losses"]  # {iteration: loss}, 1-4 in both
    assert len(whole[-1]["losses"]) == 4
    # the metric it recorded is in every step record, counted on across the resume
    assert whole[-1]["recorded"] == resumed[-1]["recorded"] == {1: 1, 2: 2, 3: 3, 4: 4}


class PhaseRecorder(Component):
    """Every hook call it sees, in order."""

    def __init__(self):
        self.events = []

    def after_load(self, iteration):
        self.events.append(("loaded", iteration))

    def on_start(self, state):
        self.events.append(("start", state.iteration))

    def before_step(self, iteration):
        self.events.append(("before", iteration))

    def after_step(self, step):
        self.events.append(("after", step.iteration))

    def phase_started(self, phase, iteration):
        self.events.append(("begin " + phase, iteration))

    def phase_ended(self, phase, iteration):
        self.events.append(("end " + phase, iteration))

    def at_end(self, state, stopped):
        self.events.append(("at_end", state.iteration))


def _record_phases(save, iters, extra):
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import run

    recorder = PhaseRecorder()
    run(parse_run_config(base_args(save, iters=iters, **extra)), [recorder])
    return recorder.events


def _paired(events):
    """Every phase that began ended, nothing overlaps but a load inside the setup."""
    open_phases = []
    for name, _ in events:
        if name.startswith("begin "):
            open_phases.append(name[6:])
        elif name.startswith("end "):
            assert open_phases and open_phases.pop() == name[4:], events
    assert not open_phases


def test_components_see_every_phase_that_is_not_a_step(tmp_path):
    save = str(tmp_path / "run")
    flags = {"eval_interval": 2, "save_interval": 2, "async_save": True}
    (events,) = run_ranks(_record_phases, 1, (save, 4, flags), tmp_path)
    _paired(events)
    names = [n for n, _ in events]
    # setup comes first and holds the checkpoint load; the loop starts after it
    assert names[:6] == [
        "begin setup", "begin checkpoint load", "loaded", "end checkpoint load", "end setup",
        "start",
    ]  # fmt: skip
    assert [e for e in events if e[0] == "begin evaluation"] == [
        ("begin evaluation", 2),
        ("begin evaluation", 4),
    ]
    assert [e for e in events if e[0] == "begin checkpoint save"] == [
        ("begin checkpoint save", 2),
        ("begin checkpoint save", 4),
    ]
    # each background write is finalized in a phase of its own, the last one before at_end
    finalize = [i for i, n in enumerate(names) if n == "begin checkpoint finalize"]
    saves = [i for i, n in enumerate(names) if n == "begin checkpoint save"]
    assert finalize and finalize[0] > saves[0] and finalize[-1] > saves[1]
    assert names.index("at_end") < finalize[-1]  # at_end waits for the last write
    steps = [e for e in events if e[0] in ("before", "after")]
    assert steps == [(k, i) for i in range(1, 5) for k in ("before", "after")]
    # a resumed run loads its checkpoint, then the components' state, both as loads
    (resumed,) = run_ranks(_record_phases, 1, (save, 5, {}), tmp_path)
    _paired(resumed)
    loads = [e for e in resumed if e[0] in ("begin checkpoint load", "loaded")]
    # the components' state loads after the checkpoint, so at the iteration it ends at
    assert loads == [("begin checkpoint load", 0), ("loaded", 4), ("begin checkpoint load", 4)]
    assert ("start", 4) in resumed and ("after", 5) in resumed


class FailsAtStep(PhaseRecorder):
    """Records the end of the run, and ends it with an error after step 2."""

    def after_step(self, step):
        super().after_step(step)
        if step.iteration == 2:
            raise RuntimeError("failed after step 2")

    def on_error(self, error):
        self.events.append(("error", str(error)))

    def close(self):
        self.events.append(("close", None))


def _driven_by_hand(save):
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    recorder = FailsAtStep()
    with pytest.raises(RuntimeError, match="failed after step 2"):
        with Trainer(parse_run_config(base_args(save, iters=4)), [recorder]) as trainer:
            trainer.setup()
            trainer.train()
    return recorder.events


def test_a_trainer_driven_by_hand_ends_on_an_error_as_run_does(tmp_path):
    """``with Trainer(...)``: the components hear the error, then are closed."""
    (events,) = run_ranks(_driven_by_hand, 1, (str(tmp_path / "run"),), tmp_path)
    assert events[-3:] == [("after", 2), ("error", "failed after step 2"), ("close", None)]
    assert ("before", 3) not in events


def _resume_fixture(save, iters):
    """Resume from the older-layout checkpoint; the components' state right after setup."""
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.components.counters import RunCounters
    from megatron_ext.training.components.lisa import Lisa
    from megatron_ext.training.components.spikes import SpikeMonitor
    from megatron_ext.training.trainer import Trainer

    args = [
        "--device", "cpu", "--model-size", "tiny", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "2", "--norm-type", "pre_gpas",
        "--mock-data", "--vocab-size", "128", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", str(iters), "--lr", "3e-3",
        "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--seed", "7",
        "--num-workers", "0", "--save", save, "--load", save, "--spike-threshold", "6",
        "--spike-window", "8", "--lisa-layers", "1", "--lisa-interval", "3",
    ]  # fmt: skip
    with Trainer(parse_run_config(args)) as trainer:
        trainer.setup()
        restored = {
            "iteration": trainer.state.iteration,
            "spikes": trainer.components.find(SpikeMonitor).state_dict(),
            "lisa": trainer.components.find(Lisa).state_dict(),
            "counters": trainer.components.find(RunCounters).state_dict(),
            "adam_steps": _adam_steps(trainer.optimizer),
        }
        trainer.train()
    return restored


def _adam_steps(optimizer):
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return sorted(
        {int(st["step"]) for sub in subs for st in sub.optimizer.state.values() if "step" in st}
    )


def test_a_checkpoint_in_the_older_run_state_layout_resumes(tmp_path):
    save = tmp_path / "run"
    shutil.copytree(FIXTURE, save)
    legacy = torch.load(save / "iter_0000004" / "common.pt", weights_only=False)["run_state"]
    (restored,) = run_ranks(_resume_fixture, 1, (str(save), 6), tmp_path)
    assert restored["iteration"] == legacy["iteration"] == 4
    assert restored["spikes"] == legacy["spikes"]  # the window and the count
    assert restored["lisa"] == legacy["lisa"] == {"missed_updates": [3, 1]}
    assert restored["counters"] == {"skipped_total": 0, "no_loss_total": 0}
    # each layer's Adam step was put back from the counts: 4 updates, minus those sat out
    assert restored["adam_steps"] == [1, 3, 4]
    saved = torch.load(save / "iter_0000006" / "common.pt", weights_only=False)["run_state"]
    assert set(saved["components"]) >= {"counters", "spikes", "lisa", "stop"}
    assert "spikes" not in saved and "skipped_total" not in saved  # written in today's layout
