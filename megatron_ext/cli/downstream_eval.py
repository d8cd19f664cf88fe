"""The downstream table: lm-evaluation-harness on several models (exports or training
checkpoints), the paper's commonsense tasks and few-shot setting by default.

    python tools/downstream_eval.py --out evals/1b_sft \\
        --model pre=runs/1b_pre_sft/checkpoints --model pre_gpas=runs/1b_pre_gpas_sft/checkpoints \\
        --device cuda:0 --batch-size 16

Writes ``OUT/downstream.md`` and ``OUT/downstream.csv`` (task × model: acc / acc_norm, and the
average), lm-eval's own results under ``OUT/raw/<model>/`` and checkpoint exports under
``OUT/exports/<model>/``. Run again to resume: a model already evaluated with the same
checkpoint and settings (tasks, shots, limit, dtype, lm-eval version) is not evaluated twice;
anything else is. Relative paths are taken from the directory you run it in.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.quiet import quiet_third_party_warnings

quiet_third_party_warnings()

from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.evaluation.downstream import (  # noqa: E402
    PAPER_FEWSHOT,
    PAPER_TASKS,
    DownstreamError,
    EvalSettings,
    build_table,
    evaluate,
    lm_eval_version,
    parse_models,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", action="append", required=True,
                   help="name=path of an export or a checkpoint directory (repeat)")  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--num-fewshot", type=int, default=PAPER_FEWSHOT)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a smoke test)")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval tasks")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    return p


@reports_missing_extras
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = EvalSettings(
        tasks=[t for t in args.tasks.split(",") if t],
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        include_path=args.include_path,
    )
    try:
        version = lm_eval_version()
        models = parse_models(args.model)
        results = {m.name: evaluate(m, args.out, settings, version=version) for m in models}
    except DownstreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = build_table(settings.tasks, results, settings, version)
    md, csv_path = table.write(args.out)
    print(table.markdown())
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
