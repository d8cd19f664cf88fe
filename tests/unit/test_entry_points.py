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
