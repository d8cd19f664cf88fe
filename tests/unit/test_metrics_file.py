"""The metrics file: what the writer appends after a run killed mid-line, and the one reader
(cut lines skipped and listed, a resumed run's later record wins, the cheap tail read)."""

from __future__ import annotations

import json

from megatron_ext.metrics_file import MetricsFile, StepRecord, ValidationRecord, last_iteration
from megatron_ext.training.metrics import MetricsWriter


def _step(iteration, loss):
    return StepRecord(iteration, iteration * 4, loss, 1e-3, 1.0, None, 100.0, 0.1, 0).as_dict()


def test_a_resumed_run_appends_after_a_cut_line_and_the_reader_skips_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(str(path), True)
    writer.write(_step(1, 3.0))
    writer.write(_step(2, 2.5))
    writer.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"iteration": 3, "lm_lo')  # killed mid-line
    writer = MetricsWriter(str(path), True)  # the resumed run repeats iteration 2
    writer.write(_step(2, 2.4))
    writer.write(ValidationRecord(2, 2.3, 9.97, 128, 1).as_dict())
    writer.close()

    lines = path.read_text().splitlines()
    assert len(lines) == 5 and lines[2] == '{"iteration": 3, "lm_lo'  # not glued to the next
    m = MetricsFile.read(str(path))
    assert m.unreadable == [3] and f"{path}:3: skipped 1 line(s)" in m.unreadable_note()
    assert m.train_losses() == [(1, 3.0), (2, 2.4)]  # the later record wins
    assert m.validation_losses() == [(2, 2.3)] and m.validation_at(2)["val_tokens"] == 128
    assert m.validation_at(1) is None
    assert last_iteration(str(path)) == 2


def test_step_records_leave_out_what_the_run_does_not_measure():
    cpu = _step(5, 2.0)
    assert "mfu" not in cpu and "gpas_scales" not in cpu and cpu["gate_grad_norm"] is None
    gpu = StepRecord(5, 20, 2.0, 1e-3, 1.0, 0.5, 1e5, 0.1, 0, gpas_scales=[0.9], mfu=0.4)
    assert gpu.as_dict()["mfu"] == 0.4 and gpu.as_dict()["gpas_scales"] == [0.9]
    assert json.loads(json.dumps(gpu.as_dict())) == gpu.as_dict()


def test_the_tail_read_finds_the_last_iteration_of_a_long_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_step(i, 1.0)) + "\n" for i in range(1, 2001)))
    assert last_iteration(str(path)) == 2000
    assert last_iteration(str(tmp_path / "missing.jsonl")) == 0
