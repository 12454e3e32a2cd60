"""Preemption signals: remember that SIGTERM/SIGUSR1/... arrived, act at the next save point.

The handler only records the signal (no I/O, no logging, no locks: it may interrupt the main
thread anywhere); :class:`~dcp_ext.CheckpointManager` reads the record at its next
``save()``/``maybe_save()`` and agrees with the other ranks through a collective, so every rank
checkpoints the same step even when the scheduler signalled only some of them.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable

from ..errors import DcpExtError

__all__ = ["SignalWatcher", "signal_number"]


def signal_number(sig: int | str | signal.Signals) -> signal.Signals:
    """``"SIGTERM"``, ``"term"``, ``15`` or ``signal.SIGTERM`` -> ``signal.SIGTERM``."""
    if isinstance(sig, signal.Signals):
        return sig
    if isinstance(sig, int) and not isinstance(sig, bool):
        try:
            return signal.Signals(sig)
        except ValueError:
            pass
    elif isinstance(sig, str):
        name = sig.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        s = getattr(signal, name, None)
        if isinstance(s, signal.Signals):
            return s
    raise DcpExtError(f"save_on_signal: {sig!r} is not a signal of this platform (e.g. signal.SIGTERM, 'SIGUSR1')")


class SignalWatcher:
    """Installs handlers for ``signals`` that record the first one received; ``restore()``
    puts the previous handlers back. Must be created in the main thread (Python delivers
    signals only there)."""

    def __init__(self, signals: Iterable[int | str | signal.Signals]):
        self.signals = tuple(dict.fromkeys(signal_number(s) for s in signals))
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            raise DcpExtError("save_on_signal needs the CheckpointManager to be created in the main thread "
                              "(Python runs signal handlers only there)")
        for s in self.signals:
            if s in (signal.SIGKILL, signal.SIGSTOP):
                raise DcpExtError(f"save_on_signal: {s.name} cannot be caught")
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def restore(self) -> None:
        """Reinstate the handlers that were there before (idempotent)."""
        for s, prev in self._previous.items():
            try:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not the main thread any more / interpreter exit
                pass
        self._previous.clear()
