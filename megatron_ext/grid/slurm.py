"""A grid as one Slurm array job: task i runs cell i through examples/slurm/train.sbatch (the
same launcher, preemption handling and requeue as a single run), skipping finished cells."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from megatron_ext import fileio
from megatron_ext.grid.spec import GridSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT_NAME = "grid.sbatch"


def write_array_script(
    spec: GridSpec,
    *,
    max_parallel: int | None = None,
    sbatch_options: Sequence[str] = (),
    python: str = "python3",
    device: str = "cuda",
) -> str:
    """Write ``<out>/grid.sbatch`` and return its path; ``sbatch`` it to run the grid."""
    cells = spec.cells()
    limit = f"%{max_parallel}" if max_parallel else ""
    out = os.path.abspath(spec.out)
    log_dir = os.path.join(out, "slurm")
    options = [
        "--job-name=gpas-grid",
        f"--array=0-{len(cells) - 1}{limit}",
        f"--output={log_dir}/%x-%A_%a.out",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        *sbatch_options,
    ]
    shared = " ".join(shlex.quote(a) for a in spec.train_args)
    lines = [
        "#!/bin/bash",
        f"# Grid of {len(cells)} cells ({len(spec.sizes)} sizes × {len(spec.norm_types)} norm "
        f"types × {len(spec.seeds)} seeds); written by tools/run_grid.py slurm.",
        "# Task i runs cell i with examples/slurm/train.sbatch; finished cells exit at once, so",
        "# re-submitting the same script finishes an interrupted grid.",
        *(f"#SBATCH {o}" for o in options),
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
        f"PYTHON=${{PYTHON:-{python}}}",
        f"CELL=$($PYTHON tools/run_grid.py cell --out {shlex.quote(out)} "
        '--index "$SLURM_ARRAY_TASK_ID")',
        '[[ "$CELL" == finished:* ]] && { echo "cell ${CELL#finished:} already finished"; '
        "exit 0; }",
        f'export RECIPE="$CELL/recipe.yaml" RUN="$CELL" DEVICE=${{DEVICE:-{device}}} PYTHON',
        f"exec bash examples/slurm/train.sbatch {shared}",
        "",
    ]
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(out, SCRIPT_NAME)
    fileio.write_text(path, "\n".join(lines))
    return path
