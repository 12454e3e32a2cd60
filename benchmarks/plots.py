"""One PNG per benchmark table: grouped bars, so a reader sees the ratios at a glance.

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``); without it the scripts
still write their JSON and say that the plot was skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Panel:
    """One set of axes of a chart: one group of bars per category, one bar per series.
    ``hline``: a reference line (e.g. a goal) labelled ``hline_label``; ``hlines``: more of them,
    as (value, label); ``logy``: log scale (for values that span decades, e.g. planning seconds
    from 64 to 1,024 ranks; None: only when the values span more than a factor 20)."""

    categories: Sequence[str]
    series: dict[str, Sequence[float]]
    ylabel: str
    title: str = ""
    hline: float | None = None
    hline_label: str = ""
    logy: bool | None = False
    hlines: Sequence[tuple[float, str]] = ()
    color_offset: int = 0  # start at this colour of the cycle (ratios against series 1.. keep their colours)


def _label(v: float) -> str:
    if v != v:  # NaN: not measured
        return ""
    return f"{v:.3f}" if abs(v) < 0.1 else f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"


def _lines(p: Panel) -> list[tuple[float, str]]:
    return ([(p.hline, p.hline_label)] if p.hline is not None else []) + list(p.hlines)


def _legend_width(p: Panel) -> float:
    """Inches the legend under a panel needs (up to 3 entries a row, ~0.065 inch per character)."""
    labels = [str(x) for x in p.series] + [lb for _, lb in _lines(p) if lb]
    ncol = min(3, len(labels))
    return 0.065 * sum(sorted((len(x) + 6 for x in labels), reverse=True)[:ncol]) + 1.0


def _draw(ax, p: Panel) -> None:
    n = len(p.series)
    width = 0.8 / max(1, n)
    for i, (name, values) in enumerate(p.series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(p.categories))]
        bars = ax.bar(xs, values, width, label=name, color=f"C{(i + p.color_offset) % 10}")
        ax.bar_label(bars, labels=[_label(v) for v in values], fontsize=7, padding=1)
    lines = _lines(p)
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    for (y, label), style in zip(lines, styles * len(lines)):
        ax.axhline(y, color="grey", linestyle=style, linewidth=1, label=label or None)
    vals = [v for vs in p.series.values() for v in vs if v == v and v > 0]
    auto_log = p.logy is None and bool(vals) and max(vals) / min(vals) > 20
    if p.logy or auto_log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(p.categories)), p.categories, fontsize=8)
    ax.set_ylabel(p.ylabel + (" (log scale)" if auto_log else ""))
    if p.title:
        ax.set_title(p.title, fontsize=9)
    ax.margins(y=0.12)  # room for the value labels above the tallest bars
    # under the axes, so that it never hides a bar
    ncol = min(3, n + len([lb for _, lb in lines if lb]))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=ncol, frameon=False)


def chart(path: str, title: str, panels: Sequence[Panel], note: str = "") -> bool:
    """Panels side by side in one PNG (one chart per table; a table with two kinds of figures,
    e.g. seconds and read/needed ratios, gets a panel for each). Returns False (and writes
    nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path} not written")
        return False
    widths = [max(4.5, len(p.categories) * max(1, len(p.series)) * 0.32 + 2, _legend_width(p)) for p in panels]
    # wide enough for the title and the footnote (about 0.085 / 0.06 inch per character)
    width = max(sum(widths), len(title) * 0.085, len(note) * 0.06)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.6), dpi=90, squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, p in zip(axes[0], panels):
        _draw(ax, p)
    fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def bar_chart(path: str, title: str, categories: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str, note: str = "", hline: float | None = None, hline_label: str = "") -> bool:
    """Grouped bars: one group per category, one bar per series (values labelled on the bars).
    ``hline``: a reference line (e.g. a goal). Returns False (and writes nothing) without matplotlib."""
    return chart(path, title, [Panel(categories, series, ylabel, hline=hline, hline_label=hline_label)], note)


def loadavg_note(before: Sequence[float] | str | None = None) -> str:
    """The load average for the plot's footnote: ``before`` (taken when the run started) -> now."""
    try:
        a = os.getloadavg()
    except OSError:
        return ""
    now = f"{a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f}"
    if before is None:
        return f"load average {now} (1/5/15 min)"
    if not isinstance(before, str):
        before = " / ".join(f"{float(x):.1f}" for x in list(before)[:3])
    return f"load average {before} -> {now} (1/5/15 min)"
