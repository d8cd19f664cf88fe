"""Pretrain a Llama-style model with GPAS or one of its normalization baselines.

    torchrun --nproc-per-node 8 pretrain_gpas.py --model-size 1b --norm-type pre_gpas \\
        --data-path data/c4_text_document --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model spiece.model --micro-batch-size 32 --global-batch-size 512 \\
        --train-iters 100000 --lr 5e-4 --lr-warmup-iters 10000 --bf16 --save ckpt --load ckpt

``python pretrain_gpas.py --help`` lists every flag; ``--config run.yaml`` sets any of them.
``--dry-run [--world-size N]`` checks the flags and files as training would, then prints the
layout, the parameter count of the model it would build, a memory estimate per rank and the
token budget (with a real dataset: the real tokens it holds), without training.
``--prepare-data-only [--world-size N]`` builds the packed index cache training will look for.
``--verbose`` keeps third-party warnings (hidden by default; ``PYTHONWARNINGS`` also keeps them).
With ``GPAS_EXIT_STATUS_DIR`` set (the SLURM script sets it), each rank leaves its exit code in
``<dir>/rank<RANK>``.
"""

from __future__ import annotations

import logging
import os
import sys

# Before megatron-core is imported (and in spawned workers, which re-import this module):
# third-party warnings off unless --verbose or PYTHONWARNINGS asks for them.
from megatron_ext.quiet import quiet_third_party_warnings

quiet_third_party_warnings()

from megatron_ext import fileio  # noqa: E402
from megatron_ext.checkpoint.layout import CheckpointError  # noqa: E402
from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.config import ConfigError  # noqa: E402
from megatron_ext.planning.arguments import parse_command_line  # noqa: E402
from megatron_ext.planning.plan import data_tokens, plan_run, smallest_world  # noqa: E402
from megatron_ext.planning.resolve import resolve_run  # noqa: E402
from megatron_ext.resilience import exit_codes  # noqa: E402
from megatron_ext.resilience.restart_ledger import RestartRefused  # noqa: E402
from megatron_ext.resilience.run_lock import RunLockError  # noqa: E402
from megatron_ext.training.contract import TrainingStopped  # noqa: E402
from megatron_ext.training.data_setup import prepare_data  # noqa: E402
from megatron_ext.training.trainer import run  # noqa: E402


def _configure_logging() -> None:
    """Our lines (logger ``gpas``, INFO on the logging rank) with a time stamp; megatron-core's
    own INFO chatter (bucket listings, dataset configs) only from WARNING up."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
    )


EXIT_STATUS_DIR = "GPAS_EXIT_STATUS_DIR"


def main(argv=None) -> int:
    try:
        code = _main(argv)
    except SystemExit as stop:  # argparse: a usage error (2), --help (0)
        _report_exit(_exit_code(stop))
        raise
    return _report_exit(code)


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    return stop.code if isinstance(stop.code, int) else 1  # a message: Python exits 1


@reports_missing_extras
def _main(argv=None) -> int:
    try:
        cfg, command = parse_command_line(argv)
        if command.dry_run or command.prepare_data_only:
            ws = command.world_size or int(os.environ.get("WORLD_SIZE", "0")) or smallest_world(cfg)
            resolved = resolve_run(cfg, ws)  # --world-size: the job's, planned elsewhere
            if command.prepare_data_only:
                _configure_logging()
                prepare_data(resolved, say=lambda line: print(line, flush=True))
            else:
                for line in plan_run(resolved.cfg, ws, data_tokens(resolved)).lines():
                    print(line)
            return exit_codes.OK
        _configure_logging()
        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except RunLockError as err:
        _error_once(err)
        return exit_codes.BAD_INPUT
    except CheckpointError as err:
        _error_once(err)
        return exit_codes.STOPPED
    except TrainingStopped as err:
        logging.getLogger("gpas").error(str(err))
        return exit_codes.STOPPED
    except RestartRefused as err:
        _error_once(err)
        return err.exit_code
    return exit_codes.OK


def _report_exit(code: int) -> int:
    """Leave this rank's exit code where a launcher asked for it. srun reports a step's worst
    status, so the peers it kills after one rank's deliberate stop (exit 2, 3, 4) would hide why
    the step ended; these files keep it."""
    directory = os.environ.get(EXIT_STATUS_DIR)
    if directory:
        os.makedirs(directory, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        fileio.write_text(os.path.join(directory, f"rank{rank}"), f"{code}\n")
    return code


def _error_once(err: Exception) -> None:
    """An error every rank raised alike: one ``error:`` line, from rank 0."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
