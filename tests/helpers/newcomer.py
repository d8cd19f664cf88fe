"""A newcomer's machine: a copy of the project as a fresh clone has it, an empty virtual
environment made with the machine's own Python, and the output read line by line for anything
that looks like a failure."""

import os
import re
import shutil
import subprocess
import sys

from tests.helpers import ROOT

# This machine's pip configuration names package folders that do not exist; pip says so on
# every install. Those notices are the machine's, not the project's.
PIP_MIRROR_NOTICE = re.compile(r"^WARNING: Location '[^']*' is ignored: it is neither a file")
LOOKS_LIKE_FAILURE = re.compile(r"Traceback|Error|error:|Warning|warning:|warnings\.warn")


def copy_project(dest: str) -> None:
    """The project's files as a fresh clone has them: what git tracks, plus new files not yet
    committed (outside git, the tree without build and run outputs)."""
    try:
        listed = (
            subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=ROOT,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(".git", "runs", "*.egg-info", "__pycache__", ".whl")
        shutil.copytree(ROOT, dest, ignore=ignore)
        return
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def machine_python() -> str:
    """The interpreter the machine came with, not the one running the tests (which may be a
    venv holding every package already)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def failure_lines(text: str) -> list:
    return [
        line
        for line in text.splitlines()
        if LOOKS_LIKE_FAILURE.search(line) and not PIP_MIRROR_NOTICE.match(line)
    ]


def newcomer_env(**values) -> dict:
    """This process's environment without what would leak our own installation into theirs."""
    drop = ("PYTHONPATH", "PYTHONWARNINGS", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(values)
    return env


def empty_venv(path) -> str:
    """A new virtual environment made with the machine's Python; returns its interpreter."""
    subprocess.run([machine_python(), "-m", "venv", str(path)], check=True)
    python = os.path.join(str(path), "bin", "python")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the new environment must start empty"
    return python
