"""The paper's downstream table: several models × the commonsense tasks, through
lm-evaluation-harness, as markdown and CSV.

Each model is a Hugging Face export (a directory with ``config.json``) or a training checkpoint
(exported first, ``--target gpas``). lm-eval runs once per model in its own process (memory is
returned between models) and writes its ``results_*.json`` under ``OUT/raw/<name>/``; a model
whose results are there already is not evaluated again, so an interrupted table resumes. The
table holds, per task, ``acc`` and ``acc_norm`` where the task defines it, and the average of
``acc`` over the tasks.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from megatron_ext import fileio

#: the commonsense tasks the GPAS paper's fine-tuning code evaluates (5-shot)
PAPER_TASKS = (
    "boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
    "openbookqa",
)  # fmt: skip
PAPER_FEWSHOT = 5


class DownstreamError(RuntimeError):
    """A model could not be evaluated; the message names it and says why."""


@dataclass(frozen=True)
class Model:
    name: str
    path: str

    @property
    def is_export(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "config.json"))


def parse_models(items: Sequence[str]) -> list[Model]:
    """``name=path`` items (a bare path is named by its directory)."""
    models = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not os.path.isdir(path):
            raise DownstreamError(f"--model {item}: no directory at {path}")
        models.append(Model(name, path))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise DownstreamError(
            f"--model: two models share a name ({', '.join(names)}); use name=path"
        )
    return models


@dataclass
class EvalSettings:
    tasks: Sequence[str] = PAPER_TASKS
    num_fewshot: Optional[int] = PAPER_FEWSHOT
    batch_size: str = "8"
    device: str = "cuda:0"
    dtype: str = "bfloat16"
    limit: Optional[float] = None  # per task: a count or a fraction (lm-eval's --limit)
    include_path: Optional[str] = None  # a directory of extra task YAMLs
    seed: int = 1234


def lm_eval_command(export: str, out_dir: str, s: EvalSettings) -> list[str]:
    trust = ",trust_remote_code=True" if _needs_remote_code(export) else ""
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={os.path.abspath(export)},dtype={s.dtype}{trust}",
        "--tasks", ",".join(s.tasks), "--batch_size", str(s.batch_size), "--device", s.device,
        "--output_path", out_dir, "--seed", str(s.seed),
    ]  # fmt: skip
    if s.num_fewshot is not None:
        cmd += ["--num_fewshot", str(s.num_fewshot)]
    if s.limit is not None:
        cmd += ["--limit", str(s.limit)]
    if s.include_path:
        cmd += ["--include_path", os.path.abspath(s.include_path)]
    return cmd


def _needs_remote_code(export: str) -> bool:
    """A ``--target gpas`` export ships its modeling code (``auto_map``); a Llama export not."""
    with open(os.path.join(export, "config.json"), encoding="utf-8") as f:
        return "auto_map" in json.load(f)


def read_results(out_dir: str) -> Optional[dict]:
    """{task: {metric: value}} from lm-eval's newest results file under ``out_dir``."""
    files = sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True))
    if not files:
        return None
    with open(files[-1], encoding="utf-8") as f:
        results = json.load(f)["results"]
    return {
        task: {key.split(",")[0]: value for key, value in metrics.items() if "," in key}
        for task, metrics in results.items()
    }


def evaluate(
    model: Model,
    out: str,
    settings: EvalSettings,
    *,
    cwd: Optional[str] = None,
    say: Callable[[str], None] = print,
) -> dict:
    """lm-eval on one model (exported first if it is a checkpoint); cached under ``out``."""
    raw = os.path.join(out, "raw", model.name)
    cached = read_results(raw)
    if cached is not None and all(t in cached for t in settings.tasks):
        say(f"{model.name}: results found in {raw}, not evaluated again")
        return cached
    export = model.path if model.is_export else _export(model, out, say)
    say(f"{model.name}: lm-eval on {', '.join(settings.tasks)}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        lm_eval_command(export, raw, settings), cwd=cwd, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DownstreamError(f"{model.name}: lm-eval failed (exit {proc.returncode}): {tail[0]}")
    results = read_results(raw)
    if results is None:
        raise DownstreamError(f"{model.name}: lm-eval wrote no results under {raw}")
    return results


def _export(model: Model, out: str, say) -> str:
    from megatron_ext.export.to_hf import ExportOptions, export_to_hf

    target = os.path.join(out, "exports", model.name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    say(f"{model.name}: exporting {model.path} to {target}")
    export_to_hf(ExportOptions(model.path, target, target="gpas", dtype="float32"))
    return target


@dataclass
class Table:
    tasks: list
    models: list  # names, in the order given
    scores: dict  # (task, model) -> {"acc": x, "acc_norm": y}

    def average(self, model: str) -> Optional[float]:
        accs = [self.scores.get((t, model), {}).get("acc") for t in self.tasks]
        accs = [a for a in accs if a is not None]
        return sum(accs) / len(accs) if accs else None

    def markdown(self) -> str:
        lines = [
            "| task | " + " | ".join(self.models) + " |",
            "|---|" + "---|" * len(self.models),
        ]
        for task in self.tasks:
            cells = []
            for m in self.models:
                s = self.scores.get((task, m), {})
                acc, norm = s.get("acc"), s.get("acc_norm")
                cell = "–" if acc is None else f"{100 * acc:.1f}"
                if norm is not None:
                    cell += f" / {100 * norm:.1f}"
                cells.append(cell)
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        avgs = [self.average(m) for m in self.models]
        lines.append(
            "| **average (acc)** | "
            + " | ".join("–" if a is None else f"**{100 * a:.1f}**" for a in avgs)
            + " |"
        )
        return "\n".join(lines) + "\n\nacc / acc_norm in %, where the task defines acc_norm.\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["task", "model", "acc", "acc_norm"])
        for task in self.tasks:
            for m in self.models:
                s = self.scores.get((task, m), {})
                w.writerow([task, m, s.get("acc", ""), s.get("acc_norm", "")])
        for m in self.models:
            w.writerow(["average", m, self.average(m) or "", ""])
        return buf.getvalue()

    def write(self, out: str) -> tuple[str, str]:
        md, csv_path = os.path.join(out, "downstream.md"), os.path.join(out, "downstream.csv")
        fileio.write_text(md, self.markdown())
        fileio.write_text(csv_path, self.csv())
        return md, csv_path


def build_table(tasks: Sequence[str], results: dict) -> Table:
    """``results``: {model name: {task: {metric: value}}} in the models' order."""
    scores = {
        (task, name): {k: v for k, v in r.get(task, {}).items() if k in ("acc", "acc_norm")}
        for name, r in results.items()
        for task in tasks
    }
    return Table(list(tasks), list(results), scores)
