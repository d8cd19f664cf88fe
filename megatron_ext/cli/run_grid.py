"""Run the paper's comparison: every size × norm type × seed as its own resumable run.

    # all 11 architectures, 2 seeds, 2 cells at a time on this machine
    python tools/run_grid.py run --out runs/grid --sizes 12x128 --seeds 1 2 --parallel 2 -- \\
        --device cpu --train-data-path data/train_text_document \\
        --valid-data-path data/valid_text_document --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok.model --seq-length 128 --micro-batch-size 16 \\
        --global-batch-size 16 --train-iters 600 --lr 1e-3 --lr-warmup-iters 60 \\
        --eval-interval 300 --eval-iters 16 --save-interval 100

    python tools/run_grid.py run --out runs/grid   # again: skips finished cells, resumes others
    python tools/run_grid.py status --out runs/grid
    python tools/run_grid.py slurm --out runs/grid --max-parallel 8   # a Slurm array instead
    python tools/grid_table.py runs/grid              # the table

Sizes are presets (71m, 130m, …) or shapes LAYERSxHIDDEN[xHEADS]; the flags after ``--`` are
pretrain_gpas.py's and are shared by every cell. Each cell lives in
<out>/cells/<size>/<norm type>/seed<k>/ (recipe.yaml, checkpoints/, metrics.jsonl, logs/).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.config import ConfigError  # noqa: E402
from megatron_ext.grid.runner import LocalGridRunner, _hms  # noqa: E402
from megatron_ext.grid.slurm import write_array_script  # noqa: E402
from megatron_ext.grid.spec import GridSpec, write_recipe  # noqa: E402
from megatron_ext.grid.status import FINISHED, cell_state  # noqa: E402


def _spec(args) -> GridSpec:
    """The grid from the flags, or from <out>/grid.json when only --out is given."""
    given = args.sizes or args.norm_types or args.seeds or args.train_args
    saved = os.path.isfile(os.path.join(args.out, "grid.json"))
    if not given:
        spec = GridSpec.load(args.out)
        spec.validate()
        return spec
    spec = GridSpec(
        out=args.out,
        sizes=args.sizes or [],
        norm_types=args.norm_types or ["all"],
        seeds=args.seeds or [],
        train_args=list(args.train_args),
    )
    spec.validate()
    if saved:
        old = GridSpec.load(args.out)
        old.validate()
        if not old.same_grid(spec):
            raise ConfigError(
                f"{args.out} holds another grid (its grid.json differs in sizes, norm types, "
                "seeds or shared flags); run with --out alone to continue it, or pick a new --out"
            )
    spec.save()
    return spec


def cmd_run(args) -> int:
    spec = _spec(args)
    runner = LocalGridRunner(
        spec,
        parallel=args.parallel,
        threads_per_cell=args.threads_per_cell,
        retry_failed=not args.skip_failed,
        status_every_s=args.status_every,
    )
    report = runner.run()
    cells = len(spec.cells())
    print(
        f"[grid] {len(report.finished)} finished now, {len(report.skipped)} earlier, "
        f"{len(report.failed)} failed, {len(report.interrupted)} interrupted, of {cells} cells; "
        f"{_hms(report.seconds)} in all"
    )
    for cell in report.failed:
        print(f"[grid] failed: {cell.name} (logs in {cell.logs})")
    if report.interrupted:
        print(f"[grid] the interrupted cells resume with: tools/run_grid.py run --out {spec.out}")
    return 0 if report.ok else 1


def cmd_status(args) -> int:
    spec = _spec(args)
    counts: dict = {}
    for cell in spec.cells():
        state = cell_state(cell, spec.train_iters)
        counts[state.state] = counts.get(state.state, 0) + 1
        print(f"{cell.index:>4}  {cell.name:<40} {state.summary()}  {_hms(state.seconds)}")
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def cmd_slurm(args) -> int:
    spec = _spec(args)
    for cell in spec.cells():
        write_recipe(cell)
    path = write_array_script(
        spec,
        max_parallel=args.max_parallel,
        sbatch_options=args.sbatch_option or [],
        device=args.device,
    )
    print(f"wrote {path}; submit it with: sbatch {path}")
    return 0


def cmd_cell(args) -> int:
    """For the Slurm array: print cell INDEX's directory ('finished:<dir>' when it is done)."""
    spec = GridSpec.load(args.out)
    spec.validate()
    cells = spec.cells()
    if not 0 <= args.index < len(cells):
        raise ConfigError(f"--index {args.index}: the grid has cells 0..{len(cells) - 1}")
    cell = cells[args.index]
    write_recipe(cell)
    done = cell_state(cell, spec.train_iters).state == FINISHED
    print(("finished:" if done else "") + cell.directory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # ``cell`` (one cell, what a Slurm array task runs) is left out of the listing
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,status,slurm}")

    def grid_args(q):
        q.add_argument("--out", required=True, help="the grid's directory")
        q.add_argument("--sizes", nargs="+", help="presets or LAYERSxHIDDEN[xHEADS]")
        q.add_argument("--norm-types", nargs="+", help="default: all 11")
        q.add_argument("--seeds", nargs="+", type=int)
        q.add_argument("--verbose", action="store_true", help="keep third-party warnings")
        q.add_argument("train_args", nargs=argparse.REMAINDER, help="-- pretrain_gpas.py flags")

    run = sub.add_parser("run", help="run the cells on this machine")
    run.add_argument("--parallel", type=int, default=1, help="cells at a time")
    run.add_argument("--threads-per-cell", type=int, help="default: cores / --parallel")
    run.add_argument("--skip-failed", action="store_true", help="do not retry failed cells")
    run.add_argument("--status-every", type=float, default=60.0, help="seconds between lines")
    grid_args(run)
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="each cell's state")
    grid_args(status)
    status.set_defaults(fn=cmd_status)
    slurm = sub.add_parser("slurm", help="write a Slurm array script (one task per cell)")
    slurm.add_argument("--max-parallel", type=int, help="array tasks at a time (%%N)")
    slurm.add_argument(
        "--sbatch-option", action="append", help="e.g. --sbatch-option=--time=4:00:00"
    )
    slurm.add_argument("--device", default="cuda")
    grid_args(slurm)
    slurm.set_defaults(fn=cmd_slurm)
    cell = sub.add_parser("cell")
    cell.add_argument("--out", required=True)
    cell.add_argument("--index", type=int, required=True)
    cell.set_defaults(fn=cmd_cell)
    return p


@reports_missing_extras
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "train_args", None) and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
