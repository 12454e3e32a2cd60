"""Minimal progress reporting for long work: a terminal bar plus ``logging`` milestones.

No dependency (tqdm is optional elsewhere); the bar is drawn only when stderr is a
terminal (or when forced), and is thread-safe so I/O threads can ``advance`` it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["Progress"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    """Counts bytes of a long operation; draws a bar on a terminal; logs start and end."""

    def __init__(self, what: str, total: int, enabled: bool | None = None,
                 logger: logging.Logger | None = None, stream=None):
        self.what = what
        self.total = max(int(total), 0)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) \
            if enabled is None else enabled
        self.logger = logger or logging.getLogger("dcp_ext")
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        self.logger.debug("%s: %s to go", what, _fmt_bytes(self.total))

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / max(now - self._t0, 1e-9)
        self.stream.write(f"\r{self.what} [{bar}] {frac * 100:5.1f}% "
                          f"{_fmt_bytes(self.done)}/{_fmt_bytes(self.total)} {_fmt_bytes(rate)}/s")
        self.stream.flush()

    def close(self) -> float:
        """Finish the bar and log the throughput; returns elapsed seconds."""
        dt = time.perf_counter() - self._t0
        if self.enabled:
            with self._lock:
                self._draw(time.perf_counter())
                self.stream.write("\n")
                self.stream.flush()
        self.logger.info("%s: %s in %.2fs (%s/s)", self.what, _fmt_bytes(self.done), dt,
                         _fmt_bytes(self.done / max(dt, 1e-9)))
        return dt
