"""Plot runs side by side from their metrics files (JSONL written by pretrain_gpas.py):
training and validation loss against iterations, and — where telemetry was logged — the
residual stream's RMS against depth (the variance-vs-depth profile) and the GPAS scales.

    python tools/plot_run.py runs/pre/metrics.jsonl runs/pre_gpas/metrics.jsonl \\
        --labels pre pre_gpas --out comparison.png
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ext.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from megatron_ext import fileio  # noqa: E402
from megatron_ext.cli.extras import reports_missing_extras  # noqa: E402
from megatron_ext.metrics_file import MetricsFile  # noqa: E402


def plot(runs: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_telemetry = any(r.telemetry() for r in runs.values())
    fig, axes = plt.subplots(
        1, 3 if has_telemetry else 1, figsize=(16 if has_telemetry else 7, 4.5), squeeze=False
    )
    ax = axes[0][0]
    for label, r in runs.items():
        train, valid = r.train_losses(), r.validation_losses()
        if train:
            xs, ys = zip(*train, strict=True)
            (line,) = ax.plot(xs, ys, label=f"{label} train", alpha=0.8)
            if valid:
                vx, vy = zip(*valid, strict=True)
                ax.plot(vx, vy, "o--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_telemetry:
        depth, scales = axes[0][1], axes[0][2]
        for label, r in runs.items():
            if not r.telemetry():
                continue
            iteration, rows = r.telemetry()[-1]
            xs = [row["layer"] + 1 for row in rows]
            depth.plot(
                xs,
                [row["rms_after_mlp"] ** 2 for row in rows],
                "o-",
                label=f"{label} (iter {iteration})",
            )
            if any("gpas_scale" in row for row in rows):
                scales.plot(xs, [row.get("gpas_scale") for row in rows], "o-", label=label)
        from matplotlib.ticker import MaxNLocator

        for axis in (depth, scales):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        depth.set_xlabel("layer")
        depth.set_ylabel("mean square of the residual stream")
        depth.set_title("Variance vs depth")
        depth.set_yscale("log")
        depth.grid(alpha=0.3)
        depth.legend()
        scales.set_xlabel("layer")
        scales.set_ylabel("c = 1 − SiLU(g)")
        scales.set_title("GPAS scales")
        scales.grid(alpha=0.3)
        if scales.get_legend_handles_labels()[0]:
            scales.legend()
    fig.tight_layout()
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


@reports_missing_extras
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--out", default="comparison.png")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings")
    args = p.parse_args(argv)
    labels = args.labels or [
        os.path.basename(os.path.dirname(os.path.abspath(m))) for m in args.metrics
    ]
    if len(labels) != len(args.metrics):
        print("error: --labels needs one label per metrics file", file=sys.stderr)
        return 2
    for path in args.metrics:
        if not os.path.isfile(path):
            print(f"error: no metrics file at {path}", file=sys.stderr)
            return 2
    runs = {label: MetricsFile.read(path) for label, path in zip(labels, args.metrics, strict=True)}
    for r in runs.values():
        if not r.records:
            print(f"error: {r.path} holds no metrics records (is it a metrics.jsonl?)",
                  file=sys.stderr)  # fmt: skip
            return 2
        if r.unreadable_note():
            print(f"note: {r.unreadable_note()}", file=sys.stderr)
    plot(runs, args.out)
    for label, r in runs.items():
        valid = r.validation_losses()
        final = valid[-1][1] if valid else None
        print(
            f"{label}: {len(r.train_losses())} logged steps, final validation loss "
            f"{final if final is None else f'{final:.4f}'}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
