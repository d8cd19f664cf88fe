"""The hang timeouts a launch gives its monitor: its own start timeout, learned timeouts within
[floor, 90% of the process-group timeout], and a checkpoint's learned values of an earlier
version (which learned the setup too and had no first-step section) turned into this launch's."""

import pytest

from megatron_ext.config import ConfigError, DataConfig, FaultConfig, RunConfig
from megatron_ext.config.run import timeout_ceiling

pytest.importorskip("nvidia_resiliency_ext")

from megatron_ext.training.components.hang_watchdog import (  # noqa: E402
    SECTIONS,
    START_SECTIONS,
    settled_timeouts,
)


def _configured(step=30.0, start=1620.0):
    return {n: start if n in START_SECTIONS else step for n in SECTIONS}


def test_a_checkpoint_of_an_earlier_version_keeps_this_launchs_start():
    # learned by an earlier version: the setup (60 s), a save; no "first step" section at all
    section = {"setup": 60.0, "checkpoint load": 60.0, "checkpoint save": 96.0, "step": 60.0}
    out, learned, capped = settled_timeouts(
        _configured(), section, {"setup", "checkpoint load", "checkpoint save", "step"},
        floor=30.0, ceiling=1620.0,
    )  # fmt: skip
    assert set(out) == set(SECTIONS)  # every section the monitor will be asked about
    assert out["setup"] == out["checkpoint load"] == out["first step"] == 1620.0
    assert (out["checkpoint save"], out["step"]) == (96.0, 60.0)
    assert learned == {"checkpoint save", "step"} and capped == {}


def test_learned_timeouts_are_bounded_and_the_capped_ones_named():
    section = {"step": 0.5, "checkpoint save": 2400.0, "evaluation": 100.0, "gone": 5.0}
    out, learned, capped = settled_timeouts(
        _configured(), section, set(section), floor=30.0, ceiling=1620.0
    )
    assert (out["step"], out["checkpoint save"], out["evaluation"]) == (30.0, 1620.0, 100.0)
    assert capped == {"checkpoint save": 2400.0} and "gone" not in out
    assert out["checkpoint finalize"] == 30.0  # not learned: the configured value


def test_both_hang_timeouts_stay_below_90_percent_of_the_process_group_timeout():
    assert timeout_ceiling(30) == 1620.0

    def run(faults):
        return RunConfig(faults=faults, data=DataConfig(mock_data=True))

    run(FaultConfig(hang_timeout=1620.0, hang_setup_timeout=1620.0)).validate(1)
    for faults in (FaultConfig(hang_timeout=1621.0),
                   FaultConfig(hang_timeout=60.0, hang_setup_timeout=1700.0)):  # fmt: skip
        with pytest.raises(ConfigError, match="more than 90% of --distributed-timeout-minutes"):
            run(faults).validate(1)
    with pytest.raises(ConfigError, match="needs --hang-timeout"):
        run(FaultConfig(hang_setup_timeout=60.0)).validate(1)
