#!/usr/bin/env python3
"""The quickstart's last lines: per model, validation loss, perplexity and GPAS scales; the
gap between pre_gpas and pre; and the depth analysis in one line each."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext.grid.spec import GridSpec  # noqa: E402
from megatron_ext.grid.status import final_validation  # noqa: E402
from megatron_ext.metrics_file import MetricsFile  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True)
    p.add_argument("--depth", help="depth.json from tools/depth_analysis.py")
    args = p.parse_args(argv)
    spec = GridSpec.load(args.grid)
    spec.validate()
    losses = {}
    for cell in spec.cells():
        record = final_validation(cell, spec.train_iters)
        if record is None:
            print(f"{cell.norm_type:>9}: no final validation (see {cell.logs})")
            continue
        loss = float(record["val_loss"])
        losses[cell.norm_type] = loss
        line = (
            f"{cell.norm_type:>9}: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
            f"({record['val_tokens']:,} tokens, iteration {record['iteration']})"
        )
        scales = MetricsFile.read(cell.metrics_path).last_value("gpas_scales")
        if scales:
            line += (
                f"; GPAS scales c = 1 − SiLU(g) from {min(scales):.3f} to {max(scales):.3f} "
                f"(mean {sum(scales) / len(scales):.3f}; layer 1 {scales[0]:.3f}, "
                f"layer {len(scales)} {scales[-1]:.3f})"
            )
        print(line)
    if {"pre", "pre_gpas"} <= losses.keys():
        gap = losses["pre_gpas"] - losses["pre"]
        ppl_gap = math.exp(losses["pre_gpas"]) - math.exp(losses["pre"])
        print(
            f"      gap: pre_gpas − pre = {gap:+.4f} in loss, {ppl_gap:+.2f} in perplexity "
            "(negative: GPAS is better; one seed: compare with the seed spread in "
            "docs/quickstart.md)"
        )
    if args.depth and os.path.isfile(args.depth):
        with open(args.depth, encoding="utf-8") as f:
            reports = json.load(f)
        for r in reports:
            imp = r["importance"]
            low = min(range(len(imp)), key=imp.__getitem__)
            print(
                f"    depth: {r['label']:>8}: skipping a layer raises the loss by "
                f"{sum(imp) / len(imp):+.4f} on average; least important layer {low + 1} "
                f"({imp[low]:+.4f}); residual RMS {r['rms'][1]:.2f} → {r['rms'][-1]:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
