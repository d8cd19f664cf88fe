"""Every ``--flag`` written in README.md, docs/ and examples/ is an option of the command it
belongs to, read from that command's ``--help`` (so a flag handled by hand, outside argparse,
fails here); a flag of another program (torchrun, sbatch, pip, …) is left to that program.

A flag belongs to the nearest command named before it on the same logical line (continuations
joined), flags after ``run_grid.py SUB … --`` to pretrain_gpas.py, and a recipe's YAML keys to
pretrain_gpas.py. A flag with no command before it (prose, a shell array defined apart from its
command) must be an option of one of the project's commands."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

FLAG = r"(?<![\w/-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*"
PRETRAIN = ("pretrain_gpas.py",)
# programs that are not ours: their flags are theirs
OTHERS = ("torchrun", "torch.distributed.run", "srun", "sbatch", "#SBATCH", "pip", "pytest",
          "lm_eval", "nsys", "git", "apt-get", "run_tests.sh", "submit")  # fmt: skip
# flags written on purpose that no command of ours has: the worked example's own flag
# (docs/architecture.md), a placeholder, and the flags of the fine-tuning code the SFT recipe
# reproduces (OwLore's LMFlow), quoted with their source
NOT_OURS = {"--weight-ema-decay", "--no", "--block_size", "--disable_group_texts",
            "--validation_split_percentage"}  # fmt: skip
# other programs' flags where no command names them (prose, comments): Slurm's, pytest's,
# lm-eval's
THEIRS = {"--requeue", "--partition", "--cpus-per-task", "--signal", "--dist", "--durations",
          "--model_args"}  # fmt: skip


def _script_of(word: str):
    """The command (argv to run ``--help``) a word names, "other" for another program, or
    None."""
    word = re.sub(r"^\w+=\$\(", "", word).strip("\"'(`$")  # PRE=$(sbatch …
    base = os.path.basename(word)
    if base in ("pretrain_gpas.py", "gpas-pretrain"):
        return PRETRAIN
    if word.startswith("gpas-"):
        return (f"tools/{word[5:].replace('-', '_')}.py",)
    for folder in ("tools", "bench", "examples"):
        if re.search(rf"(^|/){folder}/[\w/]+\.py$", word):
            return (word[word.index(f"{folder}/") :],)
    if base in OTHERS or word in OTHERS:
        return "other"
    return None


# Runs each command's --help in one process (the imports paid once): {command: stdout or error}
_HELPS = r"""
import contextlib, io, json, os, runpy, sys, traceback
out = {}
for script, *sub in json.loads(sys.argv[1]):
    sys.argv, buf = [script, *sub, "--help"], io.StringIO()
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            buf.write(f"ERROR exit {stop.code}")
    except Exception:
        buf.write("ERROR " + traceback.format_exc())
    sys.path.pop(0)
    out[" ".join([script, *sub])] = buf.getvalue()
print(json.dumps(out))
"""


def helps_of(commands) -> dict:
    """{command: the option strings its ``--help`` shows on option lines}."""
    for script, *_ in commands:
        assert os.path.isfile(os.path.join(ROOT, script)), f"the docs name {script}: no such file"
    proc = subprocess.run([sys.executable, "-c", _HELPS, json.dumps(sorted(commands))],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for command in commands:
        text = json.loads(proc.stdout.strip().splitlines()[-1])[" ".join(command)]
        assert "ERROR" not in text, f"{' '.join(command)} --help: {text[-2000:]}"
        out[command] = frozenset(
            flag
            for line in text.splitlines()
            if re.match(r"^\s+-", line)  # an option line, not the help text around it
            for flag in re.findall(FLAG, line.split("  ")[1] if "  " in line[2:] else line)
        )
    return out


def _our_commands() -> list:
    scripts = [os.path.relpath(p, ROOT) for pattern in ("tools/*.py", "bench/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern))]  # fmt: skip
    commands = [PRETRAIN] + [(p,) for p in scripts if _has_main(os.path.join(ROOT, p))]
    return commands + [("tools/run_grid.py", sub) for sub in ("run", "status", "slurm", "cell")]


def _has_main(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return "__main__" in f.read()


def logical_lines(text: str) -> list:
    """(line number, text) with backslash continuations joined."""
    out, start, buf = [], None, ""
    for n, line in enumerate(text.splitlines(), 1):
        start = start or n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        start, buf = None, ""
    return out


def attributed_flags(text: str, yaml_keys_are_pretrain: bool = False) -> list:
    """(line, command or None, flag) for every flag in ``text``."""
    out = []
    for n, line in logical_lines(text):
        if yaml_keys_are_pretrain and (key := re.match(r"^([a-z][\w-]*):", line)):
            out.append((n, PRETRAIN, "--" + key[1]))
        command, after_dashes = None, False
        for word in re.split(r"[\s|;&]+|(?=`)", line):
            named = _script_of(word)
            if named is not None:
                command, after_dashes = named, False
                continue
            if word == "--" and command and command[0].endswith("run_grid.py"):
                after_dashes = True
                continue
            if command and command[0].endswith("run_grid.py") and len(command) == 1:
                if word in ("run", "status", "slurm", "cell"):
                    command = (command[0], word)
                    continue
            for flag in re.findall(FLAG, word):  # a boolean's --no- form is in --help too
                out.append((n, PRETRAIN if after_dashes else command, flag))
    return out


def documented_files() -> list:
    files = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]
    for pattern in ("examples/**/*.sh", "examples/**/*.sbatch", "examples/**/*.yaml"):
        files += sorted(glob.glob(pattern, root_dir=ROOT, recursive=True))
    return files


def _problems() -> list:
    found = []
    for rel in documented_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        found += [(rel, n, c, flag) for n, c, flag in attributed_flags(text, rel.endswith(".yaml"))
                  if c != "other" and flag not in NOT_OURS]  # fmt: skip
    named = {c for _, _, c, _ in found if c is not None}
    helps = helps_of(sorted(named | set(_our_commands())))
    ours = frozenset().union(*helps.values())
    problems = []
    for rel, n, command, flag in found:
        if command is None:
            if flag not in ours and flag not in THEIRS:
                problems.append(f"{rel}:{n}: {flag} is an option of none of our commands")
        elif flag not in helps[command]:
            problems.append(f"{rel}:{n}: {flag} is not in `{' '.join(command)} --help`")
    return problems


@pytest.mark.slow
def test_every_documented_flag_is_in_its_commands_help():
    problems = _problems()
    assert not problems, "\n".join(problems)


def test_the_attribution_follows_the_nearest_command():
    line = ("torchrun --nproc-per-node 8 pretrain_gpas.py --bf16 \\\n  --lr 1 && "
            "python tools/run_grid.py run --out g -- --device cpu")  # fmt: skip
    got = [(c if c in (None, "other") else " ".join(c), f) for _, c, f in attributed_flags(line)]
    assert got == [("other", "--nproc-per-node"), ("pretrain_gpas.py", "--bf16"),
                   ("pretrain_gpas.py", "--lr"), ("tools/run_grid.py run", "--out"),
                   ("pretrain_gpas.py", "--device")]  # fmt: skip
    assert attributed_flags("lr: 3\n# --not-a-key\n", True)[0][1:] == (PRETRAIN, "--lr")
