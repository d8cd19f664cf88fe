"""The installed commands (``gpas-*``) and the scripts in the repository run the same code."""

import ast
import importlib
import os
from importlib.metadata import entry_points

import pytest

from tests.helpers import ROOT

SCRIPTS = {entry.name: entry for entry in entry_points(group="console_scripts")}
OURS = sorted(name for name in SCRIPTS if name.startswith("gpas-"))


def _declared_in_setup() -> list:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return sorted(ast.literal_eval(value))
    raise AssertionError("setup.py declares no console_scripts")


def test_the_installed_commands_are_setup_pys():
    """A stale install (commands added since ``pip install -e .``) shows up here, not as a
    confusing 'command not found' later."""
    declared = _declared_in_setup()
    assert sorted(f"{SCRIPTS[n].name}={SCRIPTS[n].value}" for n in OURS) == declared


@pytest.mark.parametrize("name", OURS)
def test_command_and_repository_script_share_main(name):
    module_name, _, attr = SCRIPTS[name].value.partition(":")
    main = getattr(importlib.import_module(module_name), attr)
    assert callable(main)
    stem = module_name.rsplit(".", 1)[1]
    script = "pretrain_gpas.py" if stem == "pretrain" else os.path.join("tools", stem + ".py")
    text = open(os.path.join(ROOT, script)).read()
    assert f"from {module_name} import {attr}" in text, script


# Run a command with the optional extras' packages made unimportable, as a base install has them.
_WITHOUT_EXTRAS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec answers None
sys.argv = [{command!r}, *{args!r}]
from {module} import {attr} as main
sys.exit(main())
"""


def _without_extras(name, *args):
    import subprocess
    import sys

    from megatron_ext.cli.extras import EXTRA_OF_MODULE

    module, _, attr = SCRIPTS[name].value.partition(":")
    code = _WITHOUT_EXTRAS.format(blocked=sorted(EXTRA_OF_MODULE), command=name, args=list(args),
                                  module=module, attr=attr)  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip


@pytest.mark.parametrize("name", OURS)
def test_every_command_shows_its_help_with_the_base_install_only(name):
    proc = _without_extras(name, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1, "lm_loss": 2.0}\n{"iteration": 2, "lm_loss": 1.5}\n')
    proc = _without_extras("gpas-plot-run", str(metrics), "--out", str(tmp_path / "p.png"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    expected = "error: matplotlib is not installed; this needs the 'plot' extra"
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


def test_hang_timeout_without_its_extra_is_one_line_naming_it(tmp_path):
    args = ["--device", "cpu", "--model-size", "tiny", "--mock-data", "--train-iters", "2",
            "--lr-warmup-iters", "0", "--save", str(tmp_path), "--hang-timeout", "30"]  # fmt: skip
    proc = _without_extras("gpas-pretrain", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    expected = "error: nvidia_resiliency_ext is not installed; this needs the 'resilience' extra"
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
