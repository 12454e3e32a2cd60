"""One PNG per benchmark table: grouped bars, so a reader sees the ratios at a glance.

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``); without it the scripts
still write their JSON and say that the plot was skipped.
"""

from __future__ import annotations

import os
from typing import Sequence


def bar_chart(path: str, title: str, categories: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str, note: str = "", hline: float | None = None, hline_label: str = "") -> bool:
    """Grouped bars: one group per category, one bar per series (values labelled on the bars).
    ``hline``: a reference line (e.g. a goal). Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path} not written")
        return False
    n = len(series)
    width = 0.8 / max(1, n)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) * max(1, n) * 0.45 + 2), 3.8), dpi=90)
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in values], fontsize=7, padding=1)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label or None)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def loadavg_note() -> str:
    """The load average now, for the plot's footnote."""
    try:
        a = os.getloadavg()
        return f"load average {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} (1/5/15 min)"
    except OSError:
        return ""
