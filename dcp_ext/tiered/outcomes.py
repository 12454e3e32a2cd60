"""Persistences that run in DCP's checkpoint process (``AsyncCheckpointerType.PROCESS``).

``dcp.async_save(..., async_checkpointer_type=PROCESS)`` pickles the tiered writer and runs the
whole save in a separate, long-lived checkpoint process; the background persistence then runs
there too, after the save returns, and the trainer's writer object never hears from it. So each
pickling hands the copy a *ticket*, and the checkpoint process writes the ticket's outcome record
(``<cache>/.dcp_ext_outcomes/<ticket>.json``: state, bytes, result or error, its pid) as the
persistence goes. In the trainer, a :class:`RemoteHandle` follows that record: the writer's
``persisted`` / ``wait_persisted()`` and the module-level :func:`wait_persisted` /
:func:`pending_persists` work as with the thread executor, and a checkpoint process that dies
before finishing is reported (its fast copy stays; recovery finishes it).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

from ..errors import PersistError
from ..storage.commit import OUTCOMES_DIR, outcome_record_name
from .faststore import FastStore
from .handles import PersistHandle, PersistResult, register

__all__ = ["RemoteHandle", "issue_ticket", "record_saving", "attach_recorder"]

logger = logging.getLogger(__name__)

#: states of a ticket whose save never reached its persistence in the checkpoint process (its
#: save is still running there, failed, or the pickled copy was never used): not waited for by
#: the module-level functions, only by the writer's own ``wait_persisted``
_UNTRACKED = ("sent", "saving", "abandoned")
_ATEXIT = False


def _state(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read().rsplit(b")", 1)[-1].split()[0]


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs. A zombie (dead, not yet reaped by the trainer's
    multiprocessing) counts as dead once all its threads are gone: until then it still holds its
    files, and with them its lease on the fast-tier copy."""
    if not pid:
        return True
    try:
        if _state(f"/proc/{pid}/stat") not in (b"Z", b"X"):
            return True
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                if _state(f"/proc/{pid}/task/{task}/stat") not in (b"Z", b"X"):
                    return True
            except FileNotFoundError:
                pass
        return False
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class RemoteHandle(PersistHandle):
    """In the trainer: the persistence of one pickled writer, run by DCP's checkpoint process."""

    def __init__(self, url: str, rank: int, ticket: str, root: str):
        super().__init__(url, "", rank)
        self.ticket = ticket
        self.store = FastStore(root)
        self._state = "sent"
        self.pid: int | None = None
        self._watch: threading.Thread | None = None

    def _refresh(self) -> None:
        if self.future.done():
            return
        rec = self.store.read_json(outcome_record_name(self.ticket))
        if not isinstance(rec, dict):
            return
        self.pid = rec.get("pid")
        self.save_id = rec.get("save_id") or self.save_id
        self.bytes_done, self.bytes_total = rec.get("bytes_done", 0), rec.get("bytes_total", 0)
        self._state = rec.get("state", self._state)
        state = self._state.split(" ", 1)[0].rstrip(":")
        if state == "persisted":
            self.future.set_result(PersistResult(**rec["result"]))
        elif state in ("failed", "abandoned"):
            self.future.set_exception(PersistError(rec.get("error") or self._state))
        elif not _alive(self.pid):
            self.future.set_exception(PersistError(
                f"the checkpoint process (pid {self.pid}) persisting {self.url} (save {self.save_id[:8]}) on rank "
                f"{self.rank} died while it was {self._state}; the fast-tier copy stays, and "
                f"dcp_ext.resume_persists() (or the next tiered reader) finishes persisting it"))

    def tracked(self) -> bool:
        """Whether the checkpoint process took this save to its persistence (else the save is still
        running there, failed, or the pickled copy was never used)."""
        self._refresh()
        return self._state.split(" ", 1)[0] not in _UNTRACKED

    def done(self) -> bool:
        self._refresh()
        return self.future.done()

    def wait(self, timeout: float | None = None) -> PersistResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while not self.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(min(delay, left) if left is not None else delay)
            delay = min(0.5, delay * 1.5)
        if not self.future.done():
            raise self._timed_out(timeout)
        res = super().wait(0)
        self._forget()
        return res

    def _forget(self) -> None:
        try:
            self.store.remove([outcome_record_name(self.ticket)])
        except OSError:
            pass

    def watch(self) -> None:
        """Resolve :attr:`future` in the background (for callers of ``writer.persisted``)."""
        if self._watch is None:
            self._watch = threading.Thread(target=self._watch_loop, name="dcp_ext-outcome", daemon=True)
            self._watch.start()

    def _watch_loop(self) -> None:
        while not self.done():
            time.sleep(0.2)


def _wait_at_exit() -> None:
    """The checkpoint process is a daemon: it dies with the trainer. Let the persistences it
    already started finish first (as the thread executor's worker is joined at exit)."""
    from .handles import pending_persists

    waiting = [h for h in pending_persists() if isinstance(h, RemoteHandle)]
    if waiting:
        logger.info("waiting for %d background persistence(s) in DCP's checkpoint process before exiting",
                    len(waiting))
    for h in waiting:
        try:
            h.wait()
        except (PersistError, TimeoutError) as e:
            logger.error("%s", e)


def issue_ticket(url: str, rank: int, root: str) -> RemoteHandle:
    """In the trainer, when a tiered writer is pickled: a new ticket and the handle following it."""
    global _ATEXIT
    h = RemoteHandle(url, rank, os.urandom(8).hex(), root)
    register(h)
    if not _ATEXIT:
        _ATEXIT = True
        atexit.register(_wait_at_exit)
    return h


#: in the checkpoint process: tickets whose save started but whose persistence did not
_SAVING: dict[str, tuple[FastStore, dict]] = {}
_SAVING_LOCK = threading.Lock()


def _write(store: FastStore, ticket: str, rec: dict) -> None:
    try:
        os.makedirs(store.path(OUTCOMES_DIR), exist_ok=True)
        store.put_atomic(outcome_record_name(ticket), json.dumps(rec).encode())
    except OSError as e:  # the trainer then reports the process's death or times out
        logger.warning("cannot write the outcome record of %s: %s", ticket, e)


def _give_up_saving(keep: str | None = None) -> None:
    with _SAVING_LOCK:
        stale = [(t, v) for t, v in _SAVING.items() if t != keep]
        for t, _v in stale:
            del _SAVING[t]
    for t, (store, rec) in stale:
        _write(store, t, {**rec, "state": "abandoned", "error": f"the save of {rec['url']} in DCP's checkpoint "
                          f"process did not complete (see the error of its async_save future)"})


def record_saving(root: str, ticket: str, url: str, rank: int) -> None:
    """In the checkpoint process, when a save of ticket ``ticket`` starts. A save runs there only
    after the previous one ended, so an earlier ticket still saving never got its persistence."""
    global _ATEXIT
    store = FastStore(root)
    rec: dict[str, Any] = {"pid": os.getpid(), "state": "saving", "url": url, "rank": rank, "save_id": ""}
    _give_up_saving(keep=ticket)
    with _SAVING_LOCK:
        _SAVING[ticket] = (store, rec)
    _write(store, ticket, rec)
    if not _ATEXIT:
        _ATEXIT = True
        atexit.register(_give_up_saving)


def attach_recorder(handle: PersistHandle, root: str, ticket: str) -> None:
    """In the checkpoint process: keep ticket ``ticket``'s outcome record in step with ``handle``."""
    with _SAVING_LOCK:
        _SAVING.pop(ticket, None)
    store = FastStore(root)

    def record(h: PersistHandle) -> None:
        rec: dict[str, Any] = {"pid": os.getpid(), "state": h.state, "url": h.url, "rank": h.rank,
                               "save_id": h.save_id, "bytes_done": h.bytes_done, "bytes_total": h.bytes_total}
        if h.result is not None:
            rec["result"] = dataclasses.asdict(h.result)
        if h.state.startswith("failed"):
            rec["error"] = h.state[len("failed: "):]
        _write(store, ticket, rec)

    handle.listeners.append(record)
    record(handle)
