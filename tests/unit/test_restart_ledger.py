"""The restart ledger on its own: a restart that keeps resuming from the same checkpoint is
refused after NO_PROGRESS_LIMIT of them, a restart after a deliberate stop is refused at once,
and a start by a person always runs."""

import pytest

from megatron_ext.resilience import exit_codes
from megatron_ext.resilience.exit_codes import NO_PROGRESS
from megatron_ext.resilience.restart_ledger import (
    NO_PROGRESS_LIMIT,
    RestartLedger,
    RestartRefused,
)


def _env(attempt, run="job-1"):
    return {"TORCHELASTIC_RUN_ID": run, "TORCHELASTIC_RESTART_COUNT": str(attempt)}


def test_restarts_from_the_same_checkpoint_stop_after_the_limit(tmp_path):
    ledger = RestartLedger(str(tmp_path))
    ledger.check_and_record(4, _env(0))  # the first start: not a restart
    for attempt in range(1, NO_PROGRESS_LIMIT + 1):  # each fails before a newer checkpoint
        ledger.check_and_record(4, _env(attempt))
    with pytest.raises(RestartRefused, match="no progress: the last 3 restarts all resumed "
                       "from iteration 4") as refused:  # fmt: skip
        ledger.check_and_record(4, _env(NO_PROGRESS_LIMIT + 1))
    assert refused.value.exit_code == NO_PROGRESS
    # every later restart of it refuses at once, naming the stop
    with pytest.raises(RestartRefused, match="the attempt before stopped on purpose") as again:
        ledger.check_and_record(4, _env(NO_PROGRESS_LIMIT + 2))
    assert again.value.exit_code == NO_PROGRESS
    # a person starting it again is not refused
    ledger.check_and_record(4, {})


def test_progress_between_restarts_resets_the_count(tmp_path):
    ledger = RestartLedger(str(tmp_path))
    ledger.check_and_record(0, _env(0))
    resumed = [0, 0, 8, 8, 16, 16, 16]  # a newer checkpoint every second restart
    for attempt, iteration in enumerate(resumed, start=1):
        ledger.check_and_record(iteration, _env(attempt))
    assert len(ledger.starts()) == 1 + len(resumed)


def test_a_restart_after_a_deliberate_stop_is_refused_with_its_exit_code(tmp_path):
    ledger = RestartLedger(str(tmp_path))
    ledger.check_and_record(12, _env(0))
    ledger.record_stop(3, "stopped at iteration 20: 10 iterations in a row were skipped")
    with pytest.raises(RestartRefused, match="exit 3: stopped at iteration 20") as refused:
        ledger.check_and_record(12, _env(1))
    assert refused.value.exit_code == exit_codes.STOPPED
    assert ledger.starts()[-1].stopped["exit"] == 3  # the refusal is recorded too


def test_an_unreadable_ledger_lets_the_restart_run(tmp_path):
    (tmp_path / "restarts.json").write_text("{half")
    RestartLedger(str(tmp_path)).check_and_record(4, _env(5))
    assert len(RestartLedger(str(tmp_path)).starts()) == 1


def test_the_slurm_script_leaves_alone_the_exit_codes_a_restart_does_not_change():
    import re
    from pathlib import Path

    from megatron_ext.resilience import exit_codes

    script = (Path(__file__).parents[2] / "examples" / "slurm" / "train.sbatch").read_text()
    listed = re.search(r'^DELIBERATE_EXITS="([\d ]+)"$', script, re.M)
    assert listed, "train.sbatch names no DELIBERATE_EXITS"
    assert tuple(int(c) for c in listed.group(1).split()) == exit_codes.DELIBERATE
