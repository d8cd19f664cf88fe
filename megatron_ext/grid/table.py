"""The grid's results in the paper's layout: architectures as rows (each GPAS variant under its
base), sizes as columns, final validation perplexity mean ± std over seeds, and the GPAS rows'
difference from their base. Markdown, CSV, and loss curves by architecture."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from dataclasses import dataclass
from typing import Optional

from megatron_ext import fileio
from megatron_ext.grid.spec import GridSpec
from megatron_ext.grid.status import FINISHED, cell_state, final_validation
from megatron_ext.metrics_file import MetricsFile
from megatron_ext.variants import NORM_TYPES, paper_order

#: the paper's row order: each base, then its GPAS variant (Post-LN has none)
PAPER_ORDER = paper_order()


def base_of(norm_type: str) -> Optional[str]:
    return NORM_TYPES[norm_type].base


@dataclass
class CellResult:
    size: str
    norm_type: str
    seed: int
    state: str
    iteration: int
    val_loss: Optional[float]  # at the last iteration; None: not finished or not evaluated
    seconds: float

    @property
    def val_ppl(self) -> Optional[float]:
        if self.val_loss is None:
            return None
        return math.exp(self.val_loss) if self.val_loss < 700 else math.inf


@dataclass
class Summary:
    """One architecture at one size over its seeds."""

    n: int
    expected: int
    mean_loss: Optional[float]
    std_loss: Optional[float]
    mean_ppl: Optional[float]
    std_ppl: Optional[float]
    diverged: int  # seeds whose final loss is not finite


def collect(spec: GridSpec) -> list[CellResult]:
    results = []
    for cell in spec.cells():
        state = cell_state(cell, spec.train_iters)
        record = final_validation(cell, spec.train_iters) if state.state == FINISHED else None
        loss = None if record is None else _number(record["val_loss"])
        results.append(
            CellResult(
                cell.size,
                cell.norm_type,
                cell.seed,
                state.state,
                state.iteration,
                loss,
                state.seconds,
            )
        )
    return results


def _number(value) -> float:
    try:
        return float(value)  # non-finite values are written as strings ("nan", "inf")
    except (TypeError, ValueError):
        return math.nan


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def summarize(spec: GridSpec, results: list[CellResult]) -> dict[tuple[str, str], Summary]:
    out = {}
    for size in spec.sizes:
        for norm in spec.norm_types:
            done = [r for r in results if (r.size, r.norm_type) == (size, norm)]
            losses = [r.val_loss for r in done if r.val_loss is not None]
            finite = [v for v in losses if math.isfinite(v)]
            mean_loss, std_loss = _mean_std(finite)
            mean_ppl, std_ppl = _mean_std([math.exp(v) for v in finite])
            out[(size, norm)] = Summary(
                len(losses),
                len(spec.seeds),
                mean_loss,
                std_loss,
                mean_ppl,
                std_ppl,
                len(losses) - len(finite),
            )
    return out


def ordered_norm_types(spec: GridSpec) -> list[str]:
    return [n for n in PAPER_ORDER if n in spec.norm_types]


def _cell_text(s: Summary, value: str, base: Optional[Summary]) -> str:
    mean = s.mean_ppl if value == "ppl" else s.mean_loss
    std = s.std_ppl if value == "ppl" else s.std_loss
    if mean is None:
        return "diverged" if s.diverged else "—"
    digits = 2 if value == "ppl" else 4
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    if base is not None:
        base_mean = base.mean_ppl if value == "ppl" else base.mean_loss
        if base_mean is not None:
            text += f" ({mean - base_mean:+.{digits}f})"
    notes = []
    if s.n < s.expected:
        notes.append(f"{s.n - s.diverged}/{s.expected} seeds")
    if s.diverged:
        notes.append(f"{s.diverged} diverged")
    return text + (f" [{', '.join(notes)}]" if notes else "")


def markdown_table(spec: GridSpec, summary: dict, value: str = "ppl") -> str:
    label = "validation perplexity" if value == "ppl" else "validation loss"
    lines = [
        f"| Architecture | {' | '.join(f'{size} {label}' for size in spec.sizes)} |",
        "|---|" + "---|" * len(spec.sizes),
    ]
    for norm in ordered_norm_types(spec):
        base = base_of(norm)
        cells = []
        for size in spec.sizes:
            base_summary = summary.get((size, base)) if base else None
            cells.append(_cell_text(summary[(size, norm)], value, base_summary))
        lines.append(f"| {NORM_TYPES[norm].description} (`{norm}`) | {' | '.join(cells)} |")
    return "\n".join(lines)


def summary_csv(spec: GridSpec, summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "size",
            "norm_type",
            "architecture",
            "seeds_finished",
            "seeds_expected",
            "diverged",
            "val_loss_mean",
            "val_loss_std",
            "val_ppl_mean",
            "val_ppl_std",
            "base",
            "val_ppl_minus_base",
            "val_loss_minus_base",
        ]
    )
    for size in spec.sizes:
        for norm in ordered_norm_types(spec):
            s = summary[(size, norm)]
            base = base_of(norm)
            b = summary.get((size, base)) if base else None
            d_ppl = d_loss = None
            if b is not None and s.mean_ppl is not None and b.mean_ppl is not None:
                d_ppl, d_loss = s.mean_ppl - b.mean_ppl, s.mean_loss - b.mean_loss
            w.writerow(
                [
                    size,
                    norm,
                    NORM_TYPES[norm].description,
                    s.n,
                    s.expected,
                    s.diverged,
                    _fmt(s.mean_loss),
                    _fmt(s.std_loss),
                    _fmt(s.mean_ppl),
                    _fmt(s.std_ppl),
                    base or "",
                    _fmt(d_ppl),
                    _fmt(d_loss),
                ]
            )
    return buf.getvalue()


def cells_csv(results: list[CellResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["size", "norm_type", "seed", "state", "iteration", "val_loss", "val_ppl", "wall_s"])
    for r in results:
        w.writerow(
            [
                r.size,
                r.norm_type,
                r.seed,
                r.state,
                r.iteration,
                _fmt(r.val_loss),
                _fmt(r.val_ppl),
                f"{r.seconds:.0f}",
            ]
        )
    return buf.getvalue()


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6g}"


def plot_loss_curves(spec: GridSpec, out: str, smooth: int = 5) -> None:
    """Training loss (mean over seeds, moving average) and validation points by architecture,
    one panel per size: each base solid, its GPAS variant dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [n for n in PAPER_ORDER if base_of(n) is None]
    colors = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(spec.sizes), figsize=(7.5 * len(spec.sizes), 5), squeeze=False)
    lowest, highest = math.inf, -math.inf
    for ax, size in zip(axes[0], spec.sizes, strict=True):
        for norm in ordered_norm_types(spec):
            runs = [
                MetricsFile.read(c.metrics_path)
                for c in spec.cells()
                if (c.size, c.norm_type) == (size, norm) and os.path.isfile(c.metrics_path)
            ]
            if not runs:
                continue
            xs, ys = _mean_curve([r.train_losses() for r in runs], smooth)
            if not xs:
                continue
            style = "--" if base_of(norm) else "-"
            color = colors[base_of(norm) or norm]
            ax.plot(xs, ys, style, color=color, label=NORM_TYPES[norm].description, lw=1.4)
            vx, vy = _mean_curve([r.validation_losses() for r in runs], 1)
            ax.plot(vx, vy, "o", color=color, ms=4, mfc="none" if base_of(norm) else color)
            finite = [y for y in ys[len(ys) // 5 :] if math.isfinite(y)]
            if finite:
                lowest, highest = min(lowest, min(finite)), max(highest, max(finite))
        ax.set_title(f"{size}: training loss (mean over seeds), validation as circles")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)
        if math.isfinite(lowest):
            pad = 0.05 * (highest - lowest + 1e-6)
            ax.set_ylim(lowest - pad, highest + pad)
    fig.tight_layout()
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _mean_curve(curves: list[list[tuple]], smooth: int) -> tuple[list, list]:
    """Mean over runs at the iterations every run logged, then a trailing moving average."""
    common = set.intersection(*(set(x for x, _ in c) for c in curves)) if curves else set()
    xs = sorted(common)
    by_run = [dict(c) for c in curves]
    ys = [statistics.fmean(_number(r[x]) for r in by_run) for x in xs]
    if smooth > 1:
        ys = [statistics.fmean(ys[max(0, i - smooth + 1) : i + 1]) for i in range(len(ys))]
    return xs, ys
