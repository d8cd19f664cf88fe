"""The downstream table from lm-eval's results files: acc / acc_norm per task and model, the
average of acc, markdown and CSV; models named on the command line."""

import csv
import io
import json

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
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert {(r["task"], r["model"]): r["acc"] for r in rows}[("average", "pre_gpas")] == "0.69"
    md_path, csv_path = table.write(str(tmp_path))
    assert open(md_path).read() == md


def test_a_missing_task_is_a_dash_not_a_zero(tmp_path):
    table = d.build_table(["boolq", "piqa"], {"m": {"boolq": {"acc": 0.5}}})
    assert "| piqa | – |" in table.markdown()
    assert table.average("m") == pytest.approx(0.5)  # over the tasks it has


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
