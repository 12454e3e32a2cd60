"""Handles on background persistences, and the process-wide registry behind
:func:`pending_persists` / :func:`wait_persisted`.

A :class:`PersistHandle` tracks one checkpoint's persistence on this rank: a
``concurrent.futures.Future`` of its :class:`PersistResult` (or
:class:`~dcp_ext.errors.PersistError`), its state and bytes copied. Persistences that run in
DCP's checkpoint process (``AsyncCheckpointerType.PROCESS``) appear here too, as handles that
follow the outcome records that process writes (:mod:`dcp_ext.tiered.outcomes`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable

from ..errors import PersistError

__all__ = ["PersistResult", "PersistHandle", "pending_persists", "wait_persisted", "register"]


@dataclasses.dataclass
class PersistResult:
    """What a finished background persistence did on this rank."""

    url: str
    save_id: str
    rank: int
    files: int
    bytes: int
    seconds: float
    committed_by_this_rank: bool


class PersistHandle:
    """One checkpoint's background persistence on this rank (see :func:`pending_persists`)."""

    def __init__(self, url: str, save_id: str, rank: int):
        self.url = url
        self.save_id = save_id
        self.rank = rank
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._state = "queued"
        self.bytes_done = 0
        self.bytes_total = 0
        self.started = time.time()
        #: the outcome was handed to a caller (module-level wait_persisted skips it then)
        self.reported = False
        #: called with the handle on every state change (outcome records of PROCESS mode)
        self.listeners: list[Callable[["PersistHandle"], None]] = []
        #: the result once persisted (also before the future resolves, for the listeners)
        self.result: PersistResult | None = None

    @property
    def state(self) -> str:
        """``queued``, ``copying <file>``, ``waiting for ...``, ``committing``, ``persisted`` or
        ``failed: <error>``."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        changed = value.split(" ", 1)[0] != self._state.split(" ", 1)[0]
        self._state = value
        if changed:
            self._notify()

    def _notify(self) -> None:
        for fn in self.listeners:
            fn(self)

    def resolve(self, result: PersistResult | None = None, error: BaseException | None = None) -> None:
        """Finish the handle (state and future); listeners see the final state first."""
        self._state = "persisted" if error is None else f"failed: {error}"
        self.result = result
        self._notify()
        if error is None:
            self.future.set_result(result)
        else:
            self.future.set_exception(error)

    def done(self) -> bool:
        return self.future.done()

    def tracked(self) -> bool:
        """Whether the module-level :func:`wait_persisted` / :func:`pending_persists` count it."""
        return True

    def wait(self, timeout: float | None = None) -> PersistResult:
        """Block until persisted; :class:`~dcp_ext.errors.PersistError` if it failed,
        ``TimeoutError`` (naming the URL and what is still under way) after ``timeout`` s."""
        try:
            res = self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout) from None
        except BaseException:
            self.reported = True
            raise
        self.reported = True
        return res

    def _timed_out(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"{self.url} (save {self.save_id[:8]}) was not persisted to its durable location within "
            f"{timeout}s on rank {self.rank}: {self.state} ({self.bytes_done}/{self.bytes_total} "
            f"bytes copied); call wait_persisted() again, or with a longer timeout")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, save={self.save_id[:8]}, rank={self.rank}, {self.state})"


_HANDLES: list[PersistHandle] = []
_LOCK = threading.Lock()


def register(handle: PersistHandle) -> None:
    """Track ``handle`` (and forget finished ones whose outcome was collected)."""
    with _LOCK:
        _HANDLES[:] = [h for h in _HANDLES if not (h.done() and h.reported)]
        _HANDLES.append(handle)


def pending_persists() -> list[PersistHandle]:
    """Background persistences of this process that have not finished yet."""
    with _LOCK:
        handles = list(_HANDLES)
    return [h for h in handles if h.tracked() and not h.done()]


def wait_persisted(timeout: float | None = None) -> list[PersistResult]:
    """Wait for every background persistence started by this process (all tiered writers, and
    their persistences in DCP's checkpoint process) whose outcome was not already collected
    through its writer's ``wait_persisted``.

    Waits for all of them, then raises the first :class:`~dcp_ext.errors.PersistError`;
    ``TimeoutError`` when ``timeout`` seconds (in total) pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _LOCK:
        handles = [h for h in _HANDLES if not h.reported]
    handles = [h for h in handles if h.tracked()]
    out, errors = [], []
    for h in handles:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(h.wait(left))
        except PersistError as e:
            errors.append(e)
    with _LOCK:
        _HANDLES[:] = [h for h in _HANDLES if not (h.done() and h.reported)]
    if errors:
        raise errors[0]
    return out
