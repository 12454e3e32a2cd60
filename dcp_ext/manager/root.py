"""A manager's root: step directories, their records, the ``latest`` pointer (no collectives).

Layout of a root (any backend: a directory, a ``memory://`` path, an S3/GCS prefix)::

    ROOT/latest                      one line: the newest complete step directory (step_200)
    ROOT/step_100/.metadata          a standard DCP checkpoint (stock readers load it) ...
    ROOT/step_100/.dcp_ext_step.json ... and the manager's record of it (metrics, wall time, layout)
    ROOT/step_200/...

Whether a step is complete is decided by :mod:`dcp_ext.storage.commit` (its ``.metadata``), never
here. The record is written *before* the save starts (so a directory the manager created is
recognisable even if the save died) and rewritten after the commit with the commit time.
Used by :class:`~dcp_ext.CheckpointManager` (on one rank) and by ``dcp-ext ls/gc/rm``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Config, load_config
from ..errors import CorruptCheckpointError, DcpExtError, StorageError
from ..storage import open_store
from ..storage.commit import (
    LATEST_NAME,
    MANIFEST_NAME,
    STEP_INFO_NAME,
    CommitState,
    child_states,
    remove_checkpoint,
)
from ..storage.fs import LocalStore

__all__ = ["StepInfo", "StepEntry", "CheckpointRoot", "jsonable_metrics"]

logger = logging.getLogger(__name__)

STEP_FORMAT = "dcp-ext-step"
STEP_FORMAT_VERSION = 1


def jsonable_metrics(metrics: Any, what: str = "metrics") -> dict:
    """``metrics`` as a JSON-able dict (0-dim tensors and numpy scalars become numbers)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise DcpExtError(f"{what}: expected a dict of name -> value, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise DcpExtError(f"{what}: keys must be strings, got {k!r}")
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
            v = v.item()
        try:
            json.dumps(v, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise DcpExtError(f"{what}[{k!r}]: {type(v).__name__} cannot be stored as JSON ({e}); pass "
                              f"numbers, strings, lists or dicts") from e
        out[k] = v
    return out


@dataclass
class StepInfo:
    """The manager's record of one step (``<step dir>/.dcp_ext_step.json``)."""

    step: int
    #: wall-clock time (Unix seconds) when the save began
    created: float = field(default_factory=time.time)
    #: when the checkpoint was committed (durable for tiered saves); None until then
    committed: float | None = None
    metrics: dict = field(default_factory=dict)
    #: the user's own ``metadata=`` for this step
    metadata: dict = field(default_factory=dict)
    world_size: int = 1
    #: the saving layout (``ParallelLayout.describe()`` of rank 0), if the planner had one
    layout: str | None = None
    #: "sync", "async"; ``tier`` is the fast-tier root of a tiered save
    mode: str = "sync"
    tier: str | None = None
    #: who wrote it: a random id per manager, host name and process id of rank 0
    run: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def to_json(self) -> bytes:
        doc = {"format": STEP_FORMAT, "version": STEP_FORMAT_VERSION, **asdict(self)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "StepInfo":
        try:
            doc = json.loads(raw)
            if doc.get("format") != STEP_FORMAT:
                raise ValueError("not a dcp-ext step record")
            if doc.get("version", 0) > STEP_FORMAT_VERSION:
                raise ValueError(f"version {doc['version']} is newer than this dcp-ext understands")
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as e:
            raise CorruptCheckpointError(f"{where}: unreadable step record ({e})") from e


@dataclass
class StepEntry:
    """One step directory found in a root."""

    step: int
    name: str
    url: str
    state: CommitState
    #: the manager's record, if the directory has one (then the manager created it)
    info: StepInfo | None = None

    @property
    def committed(self) -> bool:
        return self.state is CommitState.COMMITTED

    @property
    def owned(self) -> bool:
        return self.info is not None


class CheckpointRoot:
    """Step directories under ``url``: naming, scanning, records, ``latest``, deletion."""

    def __init__(self, url: str | os.PathLike, config: Config | None = None, *, step_prefix: str | None = None,
                 step_digits: int | None = None):
        url = os.fspath(url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        self.url = url.rstrip("/") or url
        self.config = config or load_config()
        self.prefix = step_prefix if step_prefix is not None else self.config.manager.step_prefix
        self.digits = step_digits if step_digits is not None else self.config.manager.step_digits
        self._re = re.compile(rf"^{re.escape(self.prefix)}(\d+)$")
        self._store = None
        self._infos: dict[str, StepInfo] = {}
        self._read_lock = threading.Lock()  # _read closes the store's read descriptors

    # -- naming -----------------------------------------------------------------------------
    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.url, config=self.config)
        return self._store

    def step_name(self, step: int) -> str:
        """``step_100`` (or ``step_00000100`` with ``step_digits=8``)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DcpExtError(f"step must be an int >= 0, got {step!r}")
        return f"{self.prefix}{step:0{self.digits}d}" if self.digits else f"{self.prefix}{step}"

    def parse_step(self, name: str) -> int | None:
        """The step of a directory name, or None if it is not a step directory."""
        m = self._re.match(name)
        return int(m.group(1)) if m else None

    def step_url(self, step_or_name: int | str) -> str:
        name = step_or_name if isinstance(step_or_name, str) else self.step_name(step_or_name)
        return f"{self.url}/{name}"

    def step_store(self, name: str):
        """A byte store at one step directory (same store type and options as the root; for a
        format over a byte URL, e.g. ``zarr3+file://``, the store of the byte URL)."""
        return type(self.store)(f"{self.store.url.rstrip('/')}/{name}", self.config)

    # -- scanning ---------------------------------------------------------------------------
    def scan(self, with_info: bool = True) -> list[StepEntry]:
        """Every step directory, oldest step first, complete or not (one listing, plus one read
        per step record not read before)."""
        if not self.store.exists(""):
            return []
        entries = []
        listing = self.store.list()
        for name, st in child_states(self.store, listing).items():
            step = self.parse_step(name)
            if step is None:
                continue
            entries.append(StepEntry(step, name, self.step_url(name), st.state))
        if with_info:
            have = {p for p in listing if p.endswith("/" + STEP_INFO_NAME)}
            for e in entries:
                if f"{e.name}/{STEP_INFO_NAME}" in have:
                    e.info = self.read_info(e.name, present=True)
        entries.sort(key=lambda e: e.step)
        return entries

    def read_info(self, name: str, cached: bool = True, present: bool = False) -> StepInfo | None:
        """The step record of ``name`` (None if it has none; a damaged one is logged and None).
        ``present``: the caller's listing showed it (saves an existence check)."""
        if cached and name in self._infos:
            return self._infos[name]
        rel = f"{name}/{STEP_INFO_NAME}"
        try:
            # (object stores report a missing object as damage: ask first)
            info = StepInfo.from_json(self._read(rel), f"{self.url}/{rel}") \
                if present or self.store.exists(rel) else None
        except (FileNotFoundError, CorruptCheckpointError) as e:
            if not isinstance(e, FileNotFoundError):
                logger.warning("%s", e)
            return None
        if info is None:
            return None
        self._infos[name] = info
        return info

    def write_info(self, name: str, info: StepInfo) -> None:
        """Write (or replace) the step record, creating the step directory if needed."""
        self._put(f"{name}/{STEP_INFO_NAME}", info.to_json())
        self._infos[name] = info

    def checkpoint_bytes(self, name: str) -> int | None:
        """Bytes of a committed checkpoint's data, from its JSON manifest (no unpickling);
        None if it has no manifest."""
        rel = f"{name}/{MANIFEST_NAME}"
        try:
            if not self.store.exists(rel):
                return None
            doc = json.loads(self._read(rel))
            return sum(int(it["length"]) for it in doc["items"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{self.url}/{name}/{MANIFEST_NAME}: unreadable manifest ({e})") from e

    def files_bytes(self, name: str) -> int:
        """Bytes of every file under a step directory (one size query per file)."""
        st = self.step_store(name)
        total = 0
        for p in st.list():
            try:
                total += st.size(p)
            except (FileNotFoundError, StorageError):
                pass
        return total

    # -- latest -----------------------------------------------------------------------------
    def read_latest(self) -> str | None:
        """The step directory ``latest`` names, or None."""
        try:
            if not self.store.exists(LATEST_NAME):
                return None
            text = self._read(LATEST_NAME).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        return text or None

    def write_latest(self, name: str) -> None:
        """Point ``latest`` at ``name``, atomically (temp file + rename locally; one PUT on object
        stores), so a reader sees the old or the new name, never a torn one."""
        self.store.prepare_for_write()
        self.store.put_atomic(LATEST_NAME, f"{name}\n".encode())

    # -- deletion ---------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Delete a step directory: ``.metadata`` first (no new load starts from it), then the
        rest (see :func:`dcp_ext.storage.commit.remove_checkpoint`)."""
        if self.parse_step(name) is None:
            raise DcpExtError(f"{name!r} is not a step directory of {self.url}")
        store = self.step_store(name)
        try:
            remove_checkpoint(store)
        finally:
            store.close()
        self._infos.pop(name, None)

    def _read(self, relpath: str) -> bytes:
        """Read a small file that may be replaced later (records, ``latest``): the local store
        keeps read descriptors open for immutable checkpoint files, so drop them after."""
        with self._read_lock:
            try:
                return self.store.read_bytes(relpath)
            finally:
                close = getattr(self.store, "close_readers", None)
                if close is not None:
                    close()

    def _put(self, relpath: str, data: bytes) -> None:
        store = self.store
        store.prepare_for_write()
        if isinstance(store, LocalStore):  # a file system needs the step directory first
            os.makedirs(os.path.dirname(os.path.join(store.root, relpath)), exist_ok=True)
        store.put_atomic(relpath, data)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
