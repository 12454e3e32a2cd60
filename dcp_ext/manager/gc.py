"""What to delete from a root: retention victims and leftovers of dead saves (shared by
:class:`~dcp_ext.CheckpointManager` and ``dcp-ext gc``/``rm``). Only directories a manager
created (they hold its step record) are ever chosen."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Iterable

from .retention import RetentionPolicy, StepRecord, steps_to_delete
from .root import CheckpointRoot, StepEntry

__all__ = ["retention_victims", "leftover_victims", "pid_alive"]

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False


def retention_victims(root: CheckpointRoot, entries: list[StepEntry], policy: RetentionPolicy,
                      protected: Iterable[int] = ()) -> list[StepEntry]:
    """Committed steps ``policy`` lets go: never the newest complete step, the one ``latest``
    names, a ``protected`` one, or one without a manager's record."""
    committed = [e for e in entries if e.committed]
    keep = set(protected)
    latest = root.read_latest()
    if latest is not None and root.parse_step(latest) is not None:
        keep.add(root.parse_step(latest))
    records = [StepRecord(e.step, e.owned, e.info.metrics if e.info else None) for e in committed]
    doomed = set(steps_to_delete(records, policy, keep))
    return [e for e in committed if e.step in doomed]


def leftover_victims(entries: list[StepEntry], *, busy: Iterable[int] = (), grace_s: float = 0.0,
                     keep_if: Callable[[StepEntry], bool] | None = None) -> list[StepEntry]:
    """Incomplete step directories a manager created whose save is over: not in ``busy`` (being
    written), not started less than ``grace_s`` seconds ago, not written by a process still alive
    on this host, and not kept by ``keep_if``."""
    busy = set(busy)
    host, me, now = socket.gethostname(), os.getpid(), time.time()
    out = []
    for e in entries:
        if e.committed or not e.owned or e.step in busy:
            continue
        info = e.info
        if grace_s and now - info.created < grace_s:
            logger.info("leaving incomplete %s: its save started %.0fs ago (grace %.0fs)", e.url,
                        now - info.created, grace_s)
            continue
        if info.host == host and info.pid != me and pid_alive(info.pid):
            logger.info("leaving incomplete %s: its writer (pid %d) is still running here", e.url, info.pid)
            continue
        if keep_if is not None and keep_if(e):
            continue
        out.append(e)
    return out
