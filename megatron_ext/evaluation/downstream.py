"""The paper's downstream table: several models × the commonsense tasks, through
lm-evaluation-harness, as markdown and CSV.

Each model is a Hugging Face export (a directory with ``config.json``) or a training checkpoint
(exported first, ``--target gpas``). lm-eval runs once per model in its own process (memory is
returned between models) and writes its ``results_*.json`` under
``OUT/raw/<name>/<request key>/``. The request key is a hash of everything that changes a
number: the model's identity (the checkpoint's manifest, or the export's file contents), the
tasks, the shots, ``--limit``, the dtype, the seed, the include-path's task files and
lm-evaluation-harness's version; a result is reused only when its key matches, so an interrupted
table resumes and a changed setting or a retrained model is evaluated again (older results stay
in their own folders). Exports of checkpoints are cached the same way.

The table holds ``acc`` and ``acc_norm`` (where the task defines it) per task, and two averages
over the tasks: of ``acc``, and of ``acc_norm`` where the task has it (``acc`` elsewhere). A
model missing a task gets no average. lm-eval's version, the shots and any ``--limit`` head the
table.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_ext import fileio
from megatron_ext.checkpoint import layout as checkpoint_layout
from megatron_ext.checkpoint import manifest as checkpoint_manifest

#: the commonsense tasks the GPAS paper's fine-tuning code evaluates (5-shot)
PAPER_TASKS = (
    "boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
    "openbookqa",
)  # fmt: skip
PAPER_FEWSHOT = 5
REQUEST_FILE = "request.json"
SOURCE_FILE = "gpas_source.json"  # in an export made here: the checkpoint it came from


class DownstreamError(RuntimeError):
    """A model could not be evaluated; the message names it and says why."""


@dataclass(frozen=True)
class Model:
    name: str
    path: str  # absolute: lm-eval runs in the include-path's directory

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
        models.append(Model(name, os.path.abspath(path)))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise DownstreamError(
            f"--model: two models share a name ({', '.join(names)}); use name=path"
        )
    return models


def lm_eval_version() -> str:
    found = _version("lm_eval")
    if found == "not installed":
        raise DownstreamError("lm-evaluation-harness is not installed: pip install -e '.[eval]'")
    return found


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

    def __post_init__(self):
        if self.include_path:
            self.include_path = os.path.abspath(self.include_path)

    def number_fields(self) -> dict:
        """The settings that change a score (batch size and device are taken not to)."""
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        for key in ("batch_size", "device", "include_path"):
            d.pop(key)
        if self.include_path:
            d["include_path_files"] = _tree_digest(self.include_path)
        return d


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _tree_digest(directory: str) -> str:
    """SHA-256 over every file's relative path and contents."""
    files = checkpoint_manifest.list_files(directory)
    return _digest({f: checkpoint_manifest.sha256_of(os.path.join(directory, f)) for f in files})


def model_identity(path: str) -> dict:
    """What a model's scores depend on: for a training checkpoint, the checkpoint the pointer
    names and its manifest (its files' sizes and SHA-256; sizes and times for a checkpoint
    written before manifests); for an export, its files' contents (or, for an export made
    here, the checkpoint it came from)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        source = os.path.join(path, SOURCE_FILE)
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                return json.load(f)
        return {"export": _tree_digest(path)}
    try:
        directory = checkpoint_layout.latest_checkpoint_dir(path)
    except (ValueError, FileNotFoundError) as err:
        raise DownstreamError(str(err)) from err
    if directory is None:
        raise DownstreamError(
            f"{path}: neither an export (no config.json) nor a checkpoint directory (no "
            f"{checkpoint_layout.LATEST})"
        )
    try:
        manifest = checkpoint_manifest.read(directory)
    except checkpoint_manifest.DamagedCheckpointError as err:
        raise DownstreamError(str(err)) from err
    identity = {"checkpoint": os.path.abspath(directory)}
    if manifest is not None:
        identity["manifest"] = checkpoint_manifest.sha256_of(
            os.path.join(directory, checkpoint_manifest.MANIFEST)
        )
    if manifest is None or not manifest.hashed:  # sizes alone would not tell a retrained model
        identity["files"] = _digest({
            f: [st.st_size, st.st_mtime_ns]
            for f in checkpoint_manifest.list_files(directory)
            for st in [os.stat(os.path.join(directory, f))]
        })  # fmt: skip
    return identity


def request_of(model: Model, settings: EvalSettings, version: str) -> dict:
    """Everything a score depends on; its hash names the results' folder."""
    request = {
        "model": model_identity(model.path),
        "settings": settings.number_fields(),
        "lm_eval_version": version,
    }
    if not model.is_export:  # exported here: the exporter and the modeling code count too
        request["exporter"] = {p: _version(p) for p in ("gpas-megatron", "transformers")}
    return request


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def lm_eval_command(export: str, out_dir: str, s: EvalSettings) -> list[str]:
    trust = ",trust_remote_code=True" if _needs_remote_code(export) else ""
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={os.path.abspath(export)},dtype={s.dtype}{trust}",
        "--tasks", ",".join(s.tasks), "--batch_size", str(s.batch_size), "--device", s.device,
        "--output_path", os.path.abspath(out_dir), "--seed", str(s.seed),
    ]  # fmt: skip
    if s.num_fewshot is not None:
        cmd += ["--num_fewshot", str(s.num_fewshot)]
    if s.limit is not None:
        cmd += ["--limit", str(s.limit)]
    if s.include_path:
        cmd += ["--include_path", s.include_path]  # absolute (EvalSettings)
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
    version: Optional[str] = None,
    say: Callable[[str], None] = print,
) -> dict:
    """lm-eval on one model (exported first if it is a checkpoint), run in the include-path's
    directory (its task files name their data relative to it); reused from ``out`` when the
    same request was answered before."""
    out = os.path.abspath(out)
    version = version or lm_eval_version()
    request = request_of(model, settings, version)
    raw = os.path.join(out, "raw", model.name, _digest(request)[:12])
    cached = read_results(raw)
    if cached is not None and all(t in cached for t in settings.tasks):
        say(f"{model.name}: results for this model and these settings found in {raw}")
        return cached
    export = model.path if model.is_export else _export(model, out, request["model"], say)
    say(f"{model.name}: lm-eval {version} on {', '.join(settings.tasks)}")
    fileio.write_json(os.path.join(raw, REQUEST_FILE), request)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        lm_eval_command(export, raw, settings),
        cwd=settings.include_path,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DownstreamError(f"{model.name}: lm-eval failed (exit {proc.returncode}): {tail[0]}")
    results = read_results(raw)
    if results is None:
        raise DownstreamError(f"{model.name}: lm-eval wrote no results under {raw}")
    return results


def _export(model: Model, out: str, identity: dict, say) -> str:
    """The checkpoint exported once per checkpoint identity: a retrained model is exported
    again over its earlier export (which stays whole until the new one is complete)."""
    from megatron_ext.checkpoint.layout import CheckpointError
    from megatron_ext.export.to_hf import ExportOptions, export_to_hf

    target = os.path.join(out, "exports", model.name)
    if os.path.isfile(os.path.join(target, SOURCE_FILE)) and model_identity(target) == identity:
        return target
    say(f"{model.name}: exporting {model.path} to {target}")
    try:  # the folder is the table's own: an export of an older checkpoint is replaced
        export_to_hf(
            ExportOptions(model.path, target, target="gpas", dtype="float32", overwrite=True)
        )
    except (OSError, ValueError, CheckpointError) as err:
        raise DownstreamError(f"{model.name}: the export of {model.path} failed: {err}") from err
    fileio.write_json(os.path.join(target, SOURCE_FILE), identity)
    return target


@dataclass
class Table:
    tasks: list
    models: list  # names, in the order given
    scores: dict  # (task, model) -> {"acc": x, "acc_norm": y}
    lm_eval_version: str = ""
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None

    def average(self, model: str, metric: str = "acc") -> Optional[float]:
        """Over every task (None if the model lacks one): of ``acc``, or with
        ``metric="acc_norm"`` of ``acc_norm`` where the task has it and ``acc`` elsewhere."""
        values = []
        for task in self.tasks:
            s = self.scores.get((task, model), {})
            value = s.get(metric, s.get("acc")) if metric == "acc_norm" else s.get("acc")
            if value is None:
                return None
            values.append(value)
        return sum(values) / len(values) if values else None

    def has_acc_norm(self) -> bool:
        return any("acc_norm" in s for s in self.scores.values())

    def header(self) -> str:
        shots = f"{self.num_fewshot}-shot"
        if self.num_fewshot is None:
            shots = "lm-eval's default shots"
        text = f"lm-evaluation-harness {self.lm_eval_version or '?'}, {shots}"
        if self.limit is not None:
            text += (
                f"; **--limit {self.limit:g}: a subset of each task, not comparable with full "
                "results**"
            )
        return text

    def markdown(self) -> str:
        lines = [
            self.header(),
            "",
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
        metrics = ["acc", "acc_norm"] if self.has_acc_norm() else ["acc"]
        for metric in metrics:
            avgs = [self.average(m, metric) for m in self.models]
            lines.append(
                f"| **average ({metric})** | "
                + " | ".join("–" if a is None else f"**{100 * a:.1f}**" for a in avgs)
                + " |"
            )
        lines += [
            "",
            "acc / acc_norm in %, where the task defines acc_norm. average (acc): of acc over "
            "every task; average (acc_norm): of acc_norm where the task defines it, acc "
            "elsewhere; – where a model lacks a task.",
        ]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["task", "model", "acc", "acc_norm", "num_fewshot", "limit", "lm_eval_version"])
        meta = [
            "" if self.num_fewshot is None else self.num_fewshot,
            "" if self.limit is None else self.limit,
            self.lm_eval_version,
        ]
        for task in self.tasks:
            for m in self.models:
                s = self.scores.get((task, m), {})
                w.writerow([task, m, s.get("acc", ""), s.get("acc_norm", ""), *meta])
        for m in self.models:
            acc, norm = self.average(m, "acc"), self.average(m, "acc_norm")
            w.writerow(["average", m, "" if acc is None else acc, "" if norm is None else norm,
                        *meta])  # fmt: skip
        return buf.getvalue()

    def write(self, out: str) -> tuple[str, str]:
        md, csv_path = os.path.join(out, "downstream.md"), os.path.join(out, "downstream.csv")
        fileio.write_text(md, self.markdown())
        fileio.write_text(csv_path, self.csv())
        return md, csv_path


def build_table(
    tasks: Sequence[str],
    results: dict,
    settings: Optional[EvalSettings] = None,
    version: str = "",
) -> Table:
    """``results``: {model name: {task: {metric: value}}} in the models' order."""
    scores = {
        (task, name): {k: v for k, v in r.get(task, {}).items() if k in ("acc", "acc_norm")}
        for name, r in results.items()
        for task in tasks
    }
    s = settings or EvalSettings(tasks=tasks, num_fewshot=None)
    return Table(list(tasks), list(results), scores, version, s.num_fewshot, s.limit)
