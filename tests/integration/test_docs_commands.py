"""Every command in the README and docs/ is executed, so the documentation cannot drift from
the code.

Commands that run on a CPU run as written, in a sandbox holding the paths the docs name (a C4-
shaped corpus, `spiece.model`), at tiny size: flags appended at the end override the
documented sizes (argparse keeps the last value), and a few substitutions shrink what no flag
can (8 processes → 2, 32 workers → 2). Commands that need a GPU or a cluster parse and pass
`--dry-run`, or show every flag they use in the script's `--help`. The rest are run by the test
named in RULES (its existence is checked here). Each documented command must match exactly one
rule and each rule some command, so a new command without a test, or a rule whose command left
the docs, fails.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from megatron_ext.platform.distributed import free_port
from tests.helpers import ROOT, cpu_share

# The order the sandbox walks the docs in: data before training, training before export.
DOC_ORDER = (
    "README.md",
    "docs/quickstart.md",
    "docs/data.md",
    "docs/training.md",
    "docs/checkpoints.md",
    "docs/sft.md",
    "docs/architectures.md",
    "docs/export_and_eval.md",
    "docs/grid.md",
    "docs/parallelism.md",
    "docs/slurm.md",
    "docs/gpu.md",
    "docs/testing.md",
    "docs/architecture.md",
)

# Appended to every training command run here: a tiny model on CPU for a few steps.
TINY_TRAINING = (
    "--device cpu --micro-batch-size 2 --global-batch-size 4 --train-iters 4 "
    "--lr-warmup-iters 1 --save-interval 2 --eval-interval 2 --eval-iters 1 --seq-length 64 "
    "--num-workers 0 --log-interval 1"
)
TINY_MODEL = "--model-size tiny " + TINY_TRAINING
# The SFT recipe on the tiny pretrained model: one epoch, one of its two layers trained at a time
TINY_SFT = (
    "--model-size tiny --device cpu --micro-batch-size 1 --global-batch-size 2 --seq-length 64 "
    "--epochs 1 --lisa-layers 1 --num-workers 0 --log-interval 1 --save-interval 4"
)


@dataclass(frozen=True)
class Rule:
    """How the commands matching ``pattern`` (a regex searched in the command) are proven.

    kind: ``run`` (in the sandbox, with ``subs``, (regex, replacement) pairs, applied and
    ``extra`` appended), ``dry_run``
    (``--dry-run`` appended; an ``sbatch`` of train.sbatch runs as the script's DRY_RUN),
    ``help`` (each flag appears in the script's --help), ``test`` (``proof`` names the test
    that runs it), ``install`` (pins and extras agree with run_tests.sh and setup.py).
    """

    pattern: str
    kind: str
    extra: str = ""
    subs: tuple = ()
    proof: str = ""


RULES = (
    Rule(r"^python3 -m venv \.venv && \. \.venv/bin/activate$", "test",
         proof="tests/integration/test_quickstart.py::test_first_command_in_an_empty_venv"),
    Rule(r"^bash examples/quickstart/run\.sh$", "test",
         proof="tests/integration/test_quickstart.py::test_first_command_in_an_empty_venv"),
    Rule(r"^bash run_tests\.sh", "test", proof=".ci/run"),
    Rule(r"^pip install ", "install"),
    Rule(r"^python tools/preprocess_data\.py .*--output-prefix", "run",
         subs=((r"--workers \d+", "--workers 2"),)),
    Rule(r"^python tools/preprocess_data\.py .*--stats", "run"),
    Rule(r"^python tools/train_tokenizer\.py", "run",
         subs=(("--vocab-size 4096", "--vocab-size 1000"),)),
    Rule(r"^python pretrain_gpas\.py --model-size 71m", "run", extra=TINY_MODEL),
    Rule(r"^torchrun --nproc-per-node 8 pretrain_gpas\.py --model-size", "run", extra=TINY_MODEL,
         subs=(("--nproc-per-node 8", "--nproc-per-node 2"),)),
    Rule(r"^torchrun --nproc-per-node 2 pretrain_gpas\.py --device cpu", "run"),
    Rule(r"^python pretrain_gpas\.py --config \S+ --mock-data .*--dry-run", "run"),
    Rule(r"^DRY_RUN=1 .*bash examples/slurm/train\.sbatch$", "run"),
    # the import writes megatron-core's default vocabulary padding (128); tiny pads to 64
    Rule(r"^python pretrain_gpas\.py --model-size 1b --norm-type pre --load", "run",
         extra=TINY_MODEL + " --make-vocab-size-divisible-by 128"),
    Rule(r"^python pretrain_gpas\.py --device cuda", "dry_run"),
    Rule(r"^RECIPE=examples/slurm/recipes/7b_pre_gpas\.yaml .*sbatch", "dry_run"),
    Rule(r"^RECIPE=examples/slurm/recipes/tiny_cpu\.yaml .*sbatch", "test",
         proof="tests/integration/test_slurm_cluster.py::test_launcher_trains_across_two_nodes_and_checkpoints"),
    Rule(r"^INPUT=.*preprocess_array\.sbatch", "test",
         proof="tests/integration/test_slurm_cluster.py::test_preprocessing_array_job_equals_one_process"),
    Rule(r"^python tools/run_grid\.py run --out runs/grid --sizes", "run",
         subs=(("--sizes 71m 130m --seeds 1 2",
                "--sizes 2x64 --seeds 1 --norm-types pre pre_gpas"),),
         extra=TINY_TRAINING),
    Rule(r"^python tools/run_grid\.py run --out runs/grid$", "run"),
    Rule(r"^python tools/run_grid\.py (status|slurm) ", "run"),
    Rule(r"^python tools/grid_table\.py ", "run"),
    Rule(r"^python tools/depth_analysis\.py ", "run",
         subs=(("cells/71m/", "cells/2x64/"),), extra="--num-sequences 2 --seq-length 64"),
    Rule(r"^python tools/convert_to_hf\.py ", "run"),
    Rule(r"^python tools/convert_from_hf\.py ", "run"),
    Rule(r"^lm_eval ", "test",
         proof="tests/integration/test_lm_eval.py::test_lm_eval_loglikelihoods_match_our_model"),
    Rule(r"^(GPU_CHECK_DRY_RUN=1 )?bash bench/gpu_check\.sh A ", "test",
         proof="tests/integration/test_gpu_scripts.py::test_check_a_dry_run_runs_every_command_on_cpu"),
    Rule(r"^bash bench/gpu_check\.sh B ", "test",
         proof="tests/integration/test_gpu_scripts.py::test_check_b_dry_run_commands_parse"),
    Rule(r"^bash bench/gpu_check\.sh C ", "test",
         proof="tests/integration/test_gpu_scripts.py::test_check_c_dry_run_runs_every_command_on_cpu"),
    Rule(r"^python -m pytest -q -m gpu$", "test", proof=".ci/run"),
    Rule(r"^bash bench/gpu_check\.sh suite ", "test",
         proof="tests/integration/test_gpu_scripts.py::test_suite_runs_a_part_and_records_its_outcome"),
    Rule(r"^python bench/bench_(gemm_shapes|throughput|checkpoint)\.py ", "help"),
    Rule(r"^bash examples/sft/run\.sh$", "test",
         proof="tests/integration/test_sft_recipe.py::test_the_recipe_prints_sft_losses_and_writes_the_table"),
    Rule(r"^python tools/preprocess_sft\.py .*--seq-length 256", "run"),
    Rule(r"^python tools/preprocess_sft\.py .*--pack --seq-length 512", "run",
         subs=(("--seq-length 512", "--seq-length 64"),)),
    Rule(r"^python tools/downstream_eval\.py ", "help"),  # lm-eval's tasks need the HF hub
    Rule(r"^torchrun --nproc-per-node 8 pretrain_gpas\.py --config examples/slurm/recipes/sft_1b",
         "run", extra=TINY_SFT, subs=(("--nproc-per-node 8", "--nproc-per-node 2"),)),
    Rule(r"^DRY_RUN=1 CS170K=.*pipeline\.sh$", "test",
         proof="tests/integration/test_slurm_recipes.py::test_the_sft_pipeline_submits_data_then_sft_then_the_table"),
    Rule(r"^bash tools/install_te_offline\.sh ", "test",
         proof="tests/integration/test_gpu_scripts.py::test_missing_core_wheel_is_named"),
)  # fmt: skip


# --- reading the docs ------------------------------------------------------------------------


def doc_files() -> list:
    """Every markdown file whose commands are held to this test: the README and docs/."""
    found = {"README.md"} | {
        f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")
    }
    return sorted(found, key=lambda f: DOC_ORDER.index(f) if f in DOC_ORDER else len(DOC_ORDER))


def code_blocks(text: str) -> list:
    """(language, code) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def shell_commands(code: str) -> list:
    """The commands of a bash block, each as its words joined by single spaces (continuation
    lines joined, quotes and comments removed)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [
        " ".join(w) for w in map(lambda x: shlex.split(x, comments=True), joined.splitlines()) if w
    ]


def documented() -> list:
    """(file, kind, text) for every bash command and python block, in DOC_ORDER."""
    out = []
    for rel in doc_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for lang, code in code_blocks(text):
            if lang == "bash":
                out += [(rel, "bash", cmd) for cmd in shell_commands(code)]
            elif lang == "python":
                out.append((rel, "python", code))
    return out


def rule_for(command: str) -> Rule:
    matches = [r for r in RULES if re.search(r.pattern, command)]
    assert len(matches) == 1, f"{command!r} matches {len(matches)} rules: {matches}"
    return matches[0]


# --- checks that need no sandbox ---------------------------------------------------------------


def test_every_command_has_exactly_one_rule_and_every_rule_a_command():
    commands = [text for _, kind, text in documented() if kind == "bash"]
    assert len(commands) >= 25, commands
    used = {rule_for(c) for c in commands}
    unused = [r.pattern for r in RULES if r not in used]
    assert not unused, f"rules whose command is no longer documented: {unused}"


def test_the_named_proofs_exist():
    for rule in RULES:
        if rule.kind != "test":
            continue
        path, _, name = rule.proof.partition("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            source = f.read()
        if name:
            assert re.search(rf"^def {name}\(", source, re.M), rule.proof
        else:  # CI's entry point: it must run the README's test command
            assert "run_tests.sh" in source


def test_install_commands_agree_with_the_package():
    with open(os.path.join(ROOT, "run_tests.sh"), encoding="utf-8") as f:
        run_tests = f.read()
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    extras = set(re.findall(r'^\s+"(\w+)": \[', setup, re.M))
    installs = [c for _, k, c in documented() if k == "bash" and c.startswith("pip install ")]
    assert installs
    for command in installs:
        for pin in re.findall(r"torch==[\d.]+", command):
            assert pin in run_tests, f"{command}: run_tests.sh installs another torch"
        for group in re.findall(r"\.\[([\w,]+)\]", command):
            assert set(group.split(",")) <= extras, f"{command}: unknown extra in {group}"


def test_gpu_only_benchmarks_know_their_documented_flags():
    env = {**os.environ, "PYTHONPATH": ROOT}
    for _, _, command in _commands_of_kind("help"):
        words = command.split()
        script = os.path.join(ROOT, words[1])
        shown = subprocess.run(
            [sys.executable, script, "--help"], capture_output=True, text=True, env=env
        )
        assert shown.returncode == 0, shown.stderr[-2000:]
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in shown.stdout, f"{command}: {flag} is not a flag of {words[1]}"


def _commands_of_kind(kind: str) -> list:
    return [d for d in documented() if d[1] == "bash" and rule_for(d[2]).kind == kind]


# --- the sandbox ---------------------------------------------------------------------------------

LINKED = ("pretrain_gpas.py", "megatron_ext", "tools", "examples", "bench", "tests")


def _write_c4_shard(path, docs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            record = {"text": text, "timestamp": "2019-04-25T12:00:00Z", "url": f"https://x/{i}"}
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, english_docs, mistral_model):
    """A working directory holding what the docs' commands name: the project's entry points,
    C4-shaped train and validation shards of real English text, and `spiece.model` (a real
    SentencePiece model)."""
    ws = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), ws / name)
    # Three passes over the text: enough documents (> 1,000) for the default --split 969,30,1
    # to give its test share a whole document.
    train = english_docs * 3
    half = len(train) // 2
    _write_c4_shard(ws / "c4/en/c4-train.00000-of-01024.json.gz", train[:half])
    _write_c4_shard(ws / "c4/en/c4-train.00001-of-01024.json.gz", train[half:])
    _write_c4_shard(ws / "c4/en/c4-validation.00000-of-00008.json.gz", english_docs[::7])
    shutil.copy(mistral_model, ws / "spiece.model")
    # Commonsense170K's record format (LLM-Adapters), questions made from the same text
    records = [
        {"instruction": f"Does this continue sensibly? {doc[:200]}", "input": "",
         "output": f"the correct answer is {answer}", "answer": answer}
        for doc, answer in zip(english_docs[:16], ["true", "false"] * 8, strict=True)
    ]  # fmt: skip
    (ws / "commonsense_170k.json").write_text(json.dumps(records))
    return ws


def _argv(command: str, rule: Rule, dry_run: bool) -> tuple:
    """(environment additions, argv) of a documented command as run here."""
    for pattern, new in rule.subs:
        assert re.search(pattern, command), f"{command}: substitution {pattern!r} no longer applies"
        command = re.sub(pattern, new, command)
    words = command.split()
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "torchrun":
        words[:1] = [sys.executable, "-m", "torch.distributed.run", "--master-port",
                     str(free_port())]  # fmt: skip
    words += shlex.split(rule.extra)
    if dry_run:
        words.append("--dry-run")
    return env, words


def _sbatch_dry_run(env: dict, words: list) -> tuple:
    """An sbatch of train.sbatch as the script's own DRY_RUN: its exact flags, planned for the
    job's nodes (8 GPUs each)."""
    nodes = next(int(w.split("=")[1]) for w in words if w.startswith("--nodes="))
    script = next(w for w in words if w.endswith("train.sbatch"))
    return {**env, "DRY_RUN": "1", "SLURM_NNODES": str(nodes)}, ["bash", script]


def _run(argv: list, cwd, env_extra: dict, what: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(env_extra, OMP_NUM_THREADS="1")
    ranks = "torch.distributed.run" in argv
    with cpu_share.exclusive() if ranks else contextlib.nullcontext():
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what}\n$ {shlex.join(argv)}\n{text[-4000:]}"
    return proc.stdout


def _python_block_checks(code: str) -> list:
    """What a python block says it prints: the comment after each print(...) line."""
    return [m.strip() for m in re.findall(r"^print\(.*\)\s+#(.*)$", code, re.M)]


@pytest.mark.slow
def test_documented_commands_run(sandbox):
    """Walk the docs in order and run each command that a CPU can run (tiny), dry-run the GPU
    and cluster ones."""
    ran = 0
    for rel, kind, text in documented():
        if kind == "python":
            script = sandbox / f"block{ran}.py"
            script.write_text(text)
            out = _run([sys.executable, str(script)], sandbox, {}, f"{rel}: python block")
            for expected in _python_block_checks(text):
                assert expected in out, f"{rel}: the block prints {out!r}, the doc says {expected}"
            ran += 1
            continue
        rule = rule_for(text)
        if rule.kind not in ("run", "dry_run"):
            continue
        env, argv = _argv(text, rule, dry_run=rule.kind == "dry_run" and "sbatch" not in text)
        if "sbatch" in argv:
            env, argv = _sbatch_dry_run(env, argv)
        out = _run(argv, sandbox, env, f"{rel}: {text}")
        if rule.kind == "dry_run" or "DRY_RUN" in env:
            assert "layout:" in out and "memory per GPU" in out, out
        ran += 1
    assert ran >= 15
    # what the walk left behind is what the docs say it makes
    assert (sandbox / "data" / "c4_text_document.idx").is_file()
    assert (sandbox / "exports" / "1b_pre_gpas" / "config.json").is_file()
    # the second stage started from the README's pretraining run, where the table looks for it
    assert (sandbox / "runs" / "1b_pre_gpas_sft" / "latest_checkpointed_iteration.txt").is_file()
    assert (sandbox / "runs" / "grid" / "table.md").is_file()
    assert (sandbox / "runs" / "depth" / "depth.md").is_file()
