"""Collect a grid's final validation results into the paper's table (markdown and CSV) and
plot its loss curves by architecture.

    python tools/grid_table.py runs/grid                 # writes runs/grid/table.md, …
    python tools/grid_table.py runs/grid --out results/  # or elsewhere
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext import fileio  # noqa: E402
from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.config import ConfigError  # noqa: E402
from megatron_ext.grid import table  # noqa: E402
from megatron_ext.grid.spec import GridSpec  # noqa: E402


@reports_missing_extras
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("grid", help="the grid's directory (holds grid.json)")
    p.add_argument("--out", help="where to write the table and plot (default: the grid's dir)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    args = p.parse_args(argv)
    try:
        spec = GridSpec.load(args.grid)
        spec.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.grid
    os.makedirs(out, exist_ok=True)
    results = table.collect(spec)
    summary = table.summarize(spec, results)
    ppl = table.markdown_table(spec, summary, "ppl")
    loss = table.markdown_table(spec, summary, "loss")
    done = sum(r.state == "finished" for r in results)
    header = (
        f"Final validation after {spec.train_iters} iterations; mean ± sample std over seeds "
        f"{', '.join(map(str, spec.seeds))}; GPAS rows: (difference from their base). "
        f"{done} of {len(results)} cells finished.\n\n"
    )
    fileio.write_text(os.path.join(out, "table.md"), header + ppl + "\n\n" + loss + "\n")
    fileio.write_text(os.path.join(out, "table.csv"), table.summary_csv(spec, summary))
    fileio.write_text(os.path.join(out, "cells.csv"), table.cells_csv(results))
    print(header + ppl)
    written = ["table.md", "table.csv", "cells.csv"]
    if not args.no_plot:
        table.plot_loss_curves(spec, os.path.join(out, "loss_curves.png"))
        written.append("loss_curves.png")
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
