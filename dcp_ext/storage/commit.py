"""The commit protocol: the one place that names a checkpoint's files and decides whether it
is committed.

A checkpoint location (a directory, an object prefix, a fast-tier directory) goes through:

1. *empty / missing*: nothing there;
2. *incomplete*: data files (``__{rank}_{n}.distcp``) and maybe a manifest, but no
   ``.metadata``: a save is under way there, or one died;
3. *committed*: ``.metadata`` exists. It is published last (:func:`publish`), after the JSON
   manifest and only once every rank's data is written, through
   :meth:`~dcp_ext.storage.base.Store.put_atomic` (temp name + ``os.replace`` + directory fsync
   on file systems, one PUT on object stores: never copy+delete).

Saving over a committed checkpoint (``overwrite=True``) first *un-commits* it
(:func:`uncommit`: ``.metadata`` goes before anything else), so a crash mid-overwrite leaves an
incomplete checkpoint, never a mix of two saves that looks whole. Orbax keeps the same
decision in one module (``atomicity.py``); every backend and the tiered code call this one.

The tiered code's markers (a fast-tier copy persisted; a partner's replica; each rank's part
of a background persistence) are named here as well, so no other module invents file names.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError, StorageError
from .base import Store

__all__ = [
    "METADATA_NAME",
    "MANIFEST_NAME",
    "DATA_FILE_RE",
    "PERSISTED_MARKER",
    "REPLICA_MARKER",
    "CommitState",
    "CommitStatus",
    "data_file_name",
    "data_file_rank",
    "is_data_file",
    "commit_status",
    "is_committed",
    "require_committed",
    "refuse_overwrite",
    "uncommit",
    "publish",
    "remove_stale_data",
    "persist_marker",
    "persist_marker_prefix",
    "replica_dir_name",
    "replica_dir_rank",
    "STEP_INFO_NAME",
    "LATEST_NAME",
    "child_states",
    "remove_checkpoint",
]

logger = logging.getLogger(__name__)

#: DCP's pickled metadata; its presence *is* the commit (stock readers look for it too)
METADATA_NAME = ".metadata"
#: our JSON manifest (:mod:`dcp_ext.storage.manifest`), written just before ``.metadata``
MANIFEST_NAME = ".dcp_ext.json"
#: data files, as stock ``FileSystemWriter`` names them: ``__{rank}_{n}.distcp``
DATA_FILE_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")

#: fast tier: the save id whose durable copy is committed (retention may then delete it)
PERSISTED_MARKER = ".dcp_ext_persisted"
#: fast tier: in ``replica_of_rank{r}/``, which save and files of rank r this node holds
REPLICA_MARKER = ".dcp_ext_replica.json"
#: checkpoint manager: a step directory's own record (``dcp_ext.manager``), written before the
#: save (so the manager knows the directory is its own) and completed after the commit
STEP_INFO_NAME = ".dcp_ext_step.json"
#: checkpoint manager: one line in the root naming its newest complete step directory
LATEST_NAME = "latest"
_PERSIST_MARKER_PREFIX = ".dcp_ext_persist."
_REPLICA_DIR_RE = re.compile(r"^replica_of_rank(\d+)$")


def data_file_name(rank: int, n: int) -> str:
    """The ``n``-th data file of ``rank``: ``__{rank}_{n}.distcp``."""
    return f"__{rank}_{n}.distcp"


def data_file_rank(relpath: str) -> int | None:
    """The rank that wrote data file ``relpath`` (its base name), or None if it is not one."""
    m = DATA_FILE_RE.match(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def is_data_file(relpath: str) -> bool:
    """Whether ``relpath`` (its base name) is a DCP data file."""
    return data_file_rank(relpath) is not None


def persist_marker_prefix(save_id: str) -> str:
    """Prefix of every background-persistence marker object of save ``save_id``."""
    return f"{_PERSIST_MARKER_PREFIX}{save_id}."


def persist_marker(save_id: str, what: str) -> str:
    """A background-persistence marker in the durable location (``what``: ``rank3.json``,
    ``rank3.failed``, ``FAILED``); never part of a committed checkpoint's data."""
    return persist_marker_prefix(save_id) + what


def replica_dir_name(rank: int) -> str:
    """The fast-tier subdirectory holding rank ``rank``'s replica on its partner's node."""
    return f"replica_of_rank{rank}"


def replica_dir_rank(name: str) -> int | None:
    """``replica_of_rank3`` -> 3; None for any other name."""
    m = _REPLICA_DIR_RE.match(name)
    return int(m.group(1)) if m else None


class CommitState(enum.Enum):
    """Where a checkpoint location stands in the commit protocol."""

    MISSING = "missing"  # the location does not exist
    EMPTY = "empty"  # it exists and holds nothing
    INCOMPLETE = "incomplete"  # files, but no .metadata: a save is running or died
    COMMITTED = "committed"  # .metadata exists


@dataclass(frozen=True)
class CommitStatus:
    """:func:`commit_status`'s answer: the state, and for an incomplete location the data
    files found (so errors can say how much a dead save left behind)."""

    url: str
    state: CommitState
    data_files: tuple[str, ...] = ()

    @property
    def committed(self) -> bool:
        return self.state is CommitState.COMMITTED


def is_committed(store: Store) -> bool:
    """Whether ``store`` holds a committed checkpoint (one existence check)."""
    return store.exists(METADATA_NAME)


def commit_status(store: Store) -> CommitStatus:
    """Classify ``store``'s location (two existence checks when committed: the location first,
    whose failure on an object store carries the server's error code, e.g. a wrong key)."""
    if not store.exists(""):
        return CommitStatus(store.url, CommitState.MISSING)
    if store.exists(METADATA_NAME):
        return CommitStatus(store.url, CommitState.COMMITTED)
    files = store.list()
    if not files:
        return CommitStatus(store.url, CommitState.EMPTY)
    return CommitStatus(store.url, CommitState.INCOMPLETE, tuple(f for f in files if is_data_file(f)))


def require_committed(store: Store) -> None:
    """Raise unless ``store`` holds a committed checkpoint: :class:`CheckpointNotFoundError`
    for a missing or empty location, :class:`IncompleteCheckpointError` for one a save did not
    finish (never load such a location as if it were whole)."""
    st = commit_status(store)
    if st.state is CommitState.COMMITTED:
        return
    if st.state is CommitState.MISSING:
        raise CheckpointNotFoundError(f"no checkpoint at {store.url}: the location does not exist")
    if st.state is CommitState.EMPTY:
        raise CheckpointNotFoundError(f"no checkpoint at {store.url}: the location is empty")
    raise IncompleteCheckpointError(
        f"{store.url} is an incomplete checkpoint: it holds {len(st.data_files)} data file(s) but no "
        f"{METADATA_NAME} (a save did not finish there); refusing to load it")


def refuse_overwrite(store: Store, overwrite: bool, what: str | None = None) -> bool:
    """Before a save: raise :class:`CheckpointExistsError` if ``store`` is committed and
    ``overwrite`` is false; return whether it is committed (the caller must then
    :func:`uncommit` it before changing any data). ``what`` names the location in the message
    (default: its URL). The message starts with stock DCP's phrase, which user code matches."""
    committed = is_committed(store)
    if committed and not overwrite:
        raise CheckpointExistsError(
            f"Checkpoint already exists: {what or store.url} already holds a complete checkpoint; refusing "
            f"to overwrite it (pass overwrite=True to replace it, or save to a new location)")
    return committed


def uncommit(store: Store, also: Iterable[str] = ()) -> None:
    """Take a committed checkpoint out of service before it is overwritten: ``.metadata``
    first (from then on it is *incomplete*), then the manifest and ``also`` (markers)."""
    store.remove([METADATA_NAME])
    rest = [MANIFEST_NAME, *also]
    store.remove(rest)


def publish(store: Store, manifest: bytes, metadata: bytes) -> None:
    """Commit: the manifest, then ``.metadata`` (the commit point), each atomically. Call it
    only once every rank's data is durable."""
    store.put_atomic(MANIFEST_NAME, manifest)
    store.put_atomic(METADATA_NAME, metadata)


def remove_stale_data(store: Store, used: Iterable[str], rank: int | None = None) -> list[str]:
    """Delete data files that the committed checkpoint does not use (left by the save it
    overwrote), only those of ``rank`` when given. Never raises: the checkpoint is committed
    and leftovers are harmless. Returns what was removed."""
    keep = set(used)
    try:
        stale = [p for p in store.list() if "/" not in p and is_data_file(p) and p not in keep
                 and (rank is None or data_file_rank(p) == rank)]
        if stale:
            store.remove(stale)
        return stale
    except (OSError, StorageError) as e:
        logger.warning("could not remove stale files in %s: %s", store.url, e)
        return []


def child_states(store: Store, listing: Iterable[str] | None = None) -> dict[str, CommitStatus]:
    """Classify every immediate subdirectory of ``store`` (a root holding one checkpoint per
    subdirectory, e.g. a manager's step directories) from one recursive listing (``listing``:
    ``store.list()`` if already fetched): committed when it holds its own ``.metadata``, else
    incomplete. Files directly in the root are ignored."""
    files: dict[str, list[str]] = {}
    for path in store.list() if listing is None else listing:
        if "/" in path:
            child, rest = path.split("/", 1)
            files.setdefault(child, []).append(rest)
    out = {}
    for child, rel in sorted(files.items()):
        url = f"{store.url.rstrip('/')}/{child}"
        if METADATA_NAME in rel:
            out[child] = CommitStatus(url, CommitState.COMMITTED)
        else:
            out[child] = CommitStatus(url, CommitState.INCOMPLETE,
                                      tuple(f for f in rel if "/" not in f and is_data_file(f)))
    return out


def remove_checkpoint(store: Store) -> list[str]:
    """Delete the checkpoint at ``store`` and everything else under its location.

    ``.metadata`` goes first (:func:`uncommit`), so from the first deletion on no new load can
    start from it (readers see it as incomplete); then the manifest and every other file, then
    the emptied directories. Returns the files removed."""
    uncommit(store)
    rest = store.list()
    store.remove(rest)
    store.remove_empty_dirs()
    return [METADATA_NAME, MANIFEST_NAME, *rest]
