"""The downstream table from lm-eval's results files: acc / acc_norm per task and model, the
average of acc, markdown and CSV; models named on the command line."""

import csv
import io
import json
import os
import subprocess

import pytest

from megatron_ext.evaluation import downstream as d


def _results(root, name, metrics):
    folder = root / "raw" / name / "model_dir"
    folder.mkdir(parents=True)
    body = {"results": {t: {f"{k},none": v for k, v in m.items()} | {"alias": t}
                        for t, m in metrics.items()}}  # fmt: skip
    (folder / "results_2026-12-04T10-00-00.json").write_text(json.dumps(body))


def test_table_from_lm_eval_results(tmp_path):
    _results(tmp_path, "pre", {"boolq": {"acc": 0.6, "acc_stderr": 0.01},
                               "piqa": {"acc": 0.7, "acc_norm": 0.72}})  # fmt: skip
    _results(tmp_path, "pre_gpas", {"boolq": {"acc": 0.64}, "piqa": {"acc": 0.74, "acc_norm": 0.7}})
    results = {n: d.read_results(str(tmp_path / "raw" / n)) for n in ("pre", "pre_gpas")}
    assert results["pre"]["piqa"] == {"acc": 0.7, "acc_norm": 0.72}
    table = d.build_table(["boolq", "piqa"], results)
    assert table.average("pre") == pytest.approx(0.65)
    assert table.average("pre_gpas") == pytest.approx(0.69)
    md = table.markdown()
    assert "| boolq | 60.0 | 64.0 |" in md
    assert "| piqa | 70.0 / 72.0 | 74.0 / 70.0 |" in md
    assert "| **average (acc)** | **65.0** | **69.0** |" in md
    assert "| **average (acc_norm)** | **66.0** | **67.0** |" in md
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert {(r["task"], r["model"]): r["acc"] for r in rows}[("average", "pre_gpas")] == "0.69"
    md_path, csv_path = table.write(str(tmp_path))
    assert open(md_path).read() == md


def test_a_missing_task_is_a_dash_and_leaves_no_average(tmp_path):
    table = d.build_table(["boolq", "piqa"], {"m": {"boolq": {"acc": 0.5}}, "n": {
        "boolq": {"acc": 0.5}, "piqa": {"acc": 0.7}}})  # fmt: skip
    md = table.markdown()
    assert "| piqa | – | 70.0 |" in md
    assert table.average("m") is None  # not an average over whichever tasks are present
    assert "| **average (acc)** | – | **60.0** |" in md


def test_acc_norm_average_takes_acc_where_a_task_has_no_acc_norm():
    table = d.build_table(["boolq", "hellaswag"], {"m": {
        "boolq": {"acc": 0.6}, "hellaswag": {"acc": 0.3, "acc_norm": 0.4}}})  # fmt: skip
    assert table.average("m", "acc") == pytest.approx(0.45)
    assert table.average("m", "acc_norm") == pytest.approx(0.5)  # (0.6 + 0.4) / 2
    assert "| **average (acc_norm)** | **50.0** |" in table.markdown()


def test_the_header_names_the_version_shots_and_a_limit():
    full = d.build_table(["boolq"], {"m": {"boolq": {"acc": 0.6}}},
                         d.EvalSettings(tasks=["boolq"]), "0.4.13")  # fmt: skip
    assert full.markdown().startswith("lm-evaluation-harness 0.4.13, 5-shot\n")
    smoke = d.build_table(["boolq"], {"m": {"boolq": {"acc": 0.6}}},
                          d.EvalSettings(tasks=["boolq"], limit=10), "0.4.13")  # fmt: skip
    assert "--limit 10: a subset of each task, not comparable" in smoke.markdown()
    row = next(csv.DictReader(io.StringIO(smoke.csv())))
    assert (row["limit"], row["lm_eval_version"], row["num_fewshot"]) == ("10", "0.4.13", "5")


def test_models_are_named_and_checked(tmp_path):
    (tmp_path / "a").mkdir()
    assert d.parse_models([f"x={tmp_path / 'a'}", str(tmp_path / "a")]) == [
        d.Model("x", str(tmp_path / "a")), d.Model("a", str(tmp_path / "a")),
    ]  # fmt: skip
    with pytest.raises(d.DownstreamError, match="no directory at"):
        d.parse_models([f"y={tmp_path / 'nope'}"])
    with pytest.raises(d.DownstreamError, match="two models share a name"):
        d.parse_models([f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"])


def test_the_paper_settings_reach_the_lm_eval_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpas_llama", "auto_map": {}}))
    cmd = d.lm_eval_command(str(tmp_path), "out", d.EvalSettings())
    text = " ".join(cmd)
    assert "--tasks " + ",".join(d.PAPER_TASKS) in text and "--num_fewshot 5" in text
    assert "trust_remote_code=True" in text  # a --target gpas export ships its modeling code


class FakeLmEval:
    """Stands in for the lm-eval subprocess: counts its runs and writes a results file where
    lm-eval would (the caching logic is ours; lm-eval itself is tested in test_lm_eval.py)."""

    def __init__(self):
        self.runs = []

    def __call__(self, cmd, cwd=None, **kwargs):
        out = cmd[cmd.index("--output_path") + 1]
        tasks = cmd[cmd.index("--tasks") + 1].split(",")
        self.runs.append({"cmd": cmd, "cwd": cwd})
        folder = os.path.join(out, "model")
        os.makedirs(folder, exist_ok=True)
        body = {"results": {t: {"acc,none": 0.5} for t in tasks}}
        with open(os.path.join(folder, "results_2026-12-05T10-00-00.json"), "w") as f:
            json.dump(body, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_a_result_is_reused_only_when_everything_that_changes_a_number_matches(
    tmp_path, monkeypatch
):
    fake = FakeLmEval()
    monkeypatch.setattr(d.subprocess, "run", fake)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"weights-1")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "t.yaml").write_text("task: t\n")
    monkeypatch.chdir(tmp_path)
    (model,) = d.parse_models([f"m={export}"])
    base = dict(tasks=["t"], include_path="tasks", device="cpu")

    def run(version="0.4.13", **changes):
        d.evaluate(model, "out", d.EvalSettings(**(base | changes)), version=version,
                   say=lambda _: None)  # fmt: skip
        return len(fake.runs)

    assert run() == 1
    assert run() == 1  # the same request: reused
    assert run(batch_size="2") == 1  # batch size does not change a score
    assert run(limit=5) == 2
    assert run(num_fewshot=0) == 3
    assert run(version="0.4.14") == 4
    (export / "model.safetensors").write_bytes(b"weights-2")  # a retrained model
    assert run() == 5
    (tasks_dir / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")  # the task changed
    assert run() == 6
    (export / "model.safetensors").write_bytes(b"weights-1")
    (tasks_dir / "t.yaml").write_text("task: t\n")
    assert run(limit=5) == 6  # older results are kept in their own folders, and found again
    # lm-eval runs in the task directory, with every path it is given absolute
    last = fake.runs[-1]
    assert last["cwd"] == str(tasks_dir)
    out_dir = last["cmd"][last["cmd"].index("--output_path") + 1]
    assert out_dir.startswith(str(tmp_path / "out" / "raw" / "m")), out_dir
    assert len(os.listdir(tmp_path / "out" / "raw" / "m")) == 6


def _checkpoint(root, iteration, digest, hashed=True):
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.distcp").write_bytes(b"w" * 8)
    body = {
        "iteration": iteration,
        "hashed": hashed,
        "files": {"weights.distcp": {"size": 8, "sha256": digest if hashed else None}},
    }
    (directory / "manifest.json").write_text(json.dumps(body))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return directory


def test_a_checkpoints_identity_follows_its_pointer_and_manifest(tmp_path):
    root = tmp_path / "ckpt"
    _checkpoint(root, 10, "aa")
    first = d.model_identity(str(root))
    assert d.model_identity(str(root)) == first
    _checkpoint(root, 20, "aa")
    second = d.model_identity(str(root))
    assert second != first  # a newer checkpoint
    _checkpoint(root, 20, "bb")
    assert d.model_identity(str(root)) != second  # rewritten in place
    with pytest.raises(d.DownstreamError, match="neither an export"):
        d.model_identity(str(tmp_path))


def test_an_unhashed_manifest_adds_the_files_times(tmp_path):
    """Written with --no-verify-integrity, a manifest holds sizes only: a retrained model of
    the same shape saved at the same iteration would look the same."""
    root = tmp_path / "ckpt"
    directory = _checkpoint(root, 10, None, hashed=False)
    before = d.model_identity(str(root))
    os.utime(directory / "weights.distcp", ns=(1, 1))
    assert d.model_identity(str(root)) != before


def test_a_checkpoint_that_changed_is_exported_again_over_its_earlier_export(tmp_path, monkeypatch):
    """The table re-exports a checkpoint that changed since its last export (a newer
    iteration), replacing the earlier export, and evaluates the new one."""
    import shutil

    from tests.helpers import ROOT

    fake = FakeLmEval()
    monkeypatch.setattr(d.subprocess, "run", fake)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(ROOT, "tests", "data", "checkpoints", "before_components"), ckpt)
    (model,) = d.parse_models([f"m={ckpt}"])
    settings = d.EvalSettings(tasks=["t"], device="cpu")
    lines = []
    d.evaluate(model, str(tmp_path / "out"), settings, version="0.4.13", say=lines.append)
    export = tmp_path / "out" / "exports" / "m"
    first = json.loads((export / d.SOURCE_FILE).read_text())
    assert first["checkpoint"].endswith("iter_0000004")

    newer = ckpt / "iter_0000008"  # the run went on: a newer checkpoint, the pointer moved
    shutil.copytree(ckpt / "iter_0000004", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps(manifest | {"iteration": 8}))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("8")
    d.evaluate(model, str(tmp_path / "out"), settings, version="0.4.13", say=lines.append)
    assert sum("exporting" in line for line in lines) == 2, lines
    second = json.loads((export / d.SOURCE_FILE).read_text())
    assert second["checkpoint"].endswith("iter_0000008")
    assert (export / "config.json").is_file() and not os.path.exists(f"{export}.old")
    assert len(fake.runs) == 2
    cmd = fake.runs[-1]["cmd"]
    assert f"pretrained={export}," in cmd[cmd.index("--model_args") + 1]
