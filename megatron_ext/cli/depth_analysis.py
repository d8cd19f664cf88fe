"""Depth analysis of finished models, side by side: per-layer importance (validation loss with
the layer skipped, minus the full model's), angular distance between each layer's input and
output, and the residual stream's RMS by depth.

    python tools/depth_analysis.py --model runs/pre/checkpoints runs/pre_gpas/checkpoints \\
        --labels pre pre_gpas --data-path data/valid_text_document --out runs/depth

--model takes training checkpoints (a --save directory or one iter_ directory) or Hugging Face
exports. Writes depth.md, depth.json and depth.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext import fileio  # noqa: E402
from megatron_ext.analysis import depth  # noqa: E402
from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402


@reports_missing_extras
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", nargs="+", required=True, help="checkpoints or HF exports")
    p.add_argument("--labels", nargs="+", help="one per --model (default: directory names)")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (validation)")
    p.add_argument("--num-sequences", type=int, default=32)
    p.add_argument("--seq-length", type=int, help="default: the model's maximum positions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="directory for depth.md, depth.json, depth.png")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    args = p.parse_args(argv)
    labels = args.labels or [_label(m) for m in args.model]
    if len(labels) != len(args.model):
        print("error: --labels needs one label per --model", file=sys.stderr)
        return 2
    reports = []
    try:
        for label, path in zip(labels, args.model, strict=True):
            t0 = time.perf_counter()
            model, norm_type = depth.load_hf_model(path)
            seq = args.seq_length or model.config.max_position_embeddings
            tokens = depth.validation_windows(args.data_path, args.num_sequences, seq)
            report = depth.analyze(
                model,
                tokens,
                label=label,
                source=path,
                norm_type=norm_type,
                batch_size=args.batch_size,
            )
            reports.append(report)
            worst = min(range(len(report.importance)), key=report.importance.__getitem__)
            print(
                f"{label}: loss {report.loss:.4f} on {report.num_tokens:,} tokens; least "
                f"important layer {worst + 1} (Δ {report.importance[worst]:+.4f}); "
                f"{time.perf_counter() - t0:.1f} s"
            )
    except depth.DepthAnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    fileio.write_text(os.path.join(args.out, "depth.md"), depth.markdown(reports))
    fileio.write_text(
        os.path.join(args.out, "depth.json"),
        json.dumps([r.to_json() for r in reports], indent=1),
    )
    depth.plot(reports, os.path.join(args.out, "depth.png"))
    print(f"wrote {args.out}/depth.md, depth.json, depth.png")
    return 0


def _label(path: str) -> str:
    parts = [p for p in os.path.abspath(path).split(os.sep) if p]
    skip = ("checkpoints",)
    parts = [p for p in parts if p not in skip and not p.startswith("iter_")]
    return "/".join(parts[-2:])


if __name__ == "__main__":
    sys.exit(main())
