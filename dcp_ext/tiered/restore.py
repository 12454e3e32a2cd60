"""Running the file moves of a tiered load (:func:`~dcp_ext.tiered.choice.plan_load_transfers`,
:func:`~dcp_ext.tiered.choice.plan_repair_transfers`) over the side group.

Every rank walks the same list in order and takes part in the transfers that concern it
(blocking send/recv: no deadlock, since everyone agrees on the order). Received files stay under
temporary names until every rank has reported how its transfers went; then a file appears under
its name only if both its sender and its receiver succeeded, and a rebuilt replica gets its
marker last.

A received file counts as received only once its bytes pass the checkpoint's own checksums (the
block checksums its manifest records for every item stored in it, :func:`verify_received`): the
receiver checks the finished temporary file before it reports. A mismatch fails the transfer
like a failed write does (the file is not published, a replica it belongs to gets no marker, the
source copy is not offered again during the load), so a copy damaged on the sender's disk or on
the way is never published or vouched for. Checking happens between the streaming and the
gathered outcome, so every rank still takes part in the same collectives.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping, Sequence

from ..integrity import ChecksumMismatch
from ..storage.commit import REPLICA_MARKER, replica_dir_name, replica_dir_rank
from ..storage.manifest import ItemLocation
from ..verify import FrameDamaged, check_item, damage_text
from .exchange import FileSink, FileSource, barrier, gather, stream_files
from .faststore import FastStore
from .records import Purpose, Transfer

__all__ = ["run_transfers", "verify_received", "ExpectedItems"]

#: data file name -> the ``(index, location)`` of every item the checkpoint stores in it (from the
#: manifest of the save being loaded: the checksums a received copy must match)
ExpectedItems = Mapping[str, Sequence[tuple[Any, ItemLocation]]]

logger = logging.getLogger(__name__)


def run_transfers(transfers: Sequence[Transfer], rank: int, group: Any, fast: FastStore, chunk: int,
                  save_id: str, expected: ExpectedItems | None = None) -> set[int]:
    """Run ``transfers``; returns the indices that succeeded (the same set on every rank).

    ``expected``: the checkpoint's items by data file; each received file is checked against
    them (:func:`verify_received`) before it counts as received. None (only for callers without
    a manifest) receives files unchecked."""
    t0 = time.perf_counter()
    for s in sorted({replica_dir_rank(t.dst_relpath.split("/")[0]) for t in transfers
                     if t.dst == rank and t.purpose is Purpose.REPLICA}):
        rep = fast.sub(replica_dir_name(s))  # an old replica goes first, its marker before its files
        rep.remove([REPLICA_MARKER])
        rep.remove_tree()
    sinks: dict[int, FileSink] = {}
    errors: dict[int, str] = {}
    nbytes = 0
    for i, t in enumerate(transfers):
        if rank == t.src:
            source = FileSource(fast, [(t.src_relpath, t.size)])
            stream_files(source, t.dst, None, t.src, group, chunk, f"restore of {t.name}")
            if source.error is not None:
                errors[i] = f"rank {rank} could not read {fast.path(t.src_relpath)}: {source.error}"
            nbytes += t.size
        elif rank == t.dst:
            sink = FileSink(fast, [(t.dst_relpath, t.size)], publish=False)
            stream_files(None, t.dst, sink, t.src, group, chunk, f"restore of {t.name}")
            sinks[i] = sink
            if sink.error is not None:
                errors[i] = f"rank {rank} could not write {fast.path(t.dst_relpath)}: {sink.error}"
            elif expected is not None:
                for f in sink.done:
                    problem = verify_received(
                        fast, f.tmp, t.name, expected.get(t.name, ()), rank, f"rank {t.src} ({t.src_relpath} on its node)",
                        t.dst_relpath.split("/")[0] if t.purpose is Purpose.REPLICA else None)
                    if problem is not None:  # logged with the gathered outcome, on every rank
                        errors[i] = problem
                        break
            nbytes += t.size
    failed: dict[int, str] = {}
    for errs in gather(errors, group, "restore outcome") if transfers else ():
        failed.update(errs)
    publish_error: BaseException | None = None
    try:
        for i, sink in sinks.items():
            if i in failed:
                sink.abort()
            else:
                for f in sink.done:
                    f.publish()
        _mark_replicas(transfers, failed, rank, fast, save_id)
    except BaseException as e:  # noqa: BLE001 - raised after the barrier, so no peer waits for us
        publish_error = e
    # a file received by one rank of a node is read by the others: none reads before it is published
    if transfers:
        barrier(group, "restore published")
    if publish_error is not None:
        raise publish_error
    for i, msg in sorted(failed.items()):
        logger.warning("rank %d: restoring %s from rank %d failed: %s", rank, transfers[i].name, transfers[i].src, msg)
    if any(rank in (t.src, t.dst) for t in transfers):
        logger.info("rank %d: fast-tier restore moved %d file(s) over the process group (%.1f MiB by this rank, "
                    "%.2fs)", rank, len(transfers), nbytes / 2**20, time.perf_counter() - t0)
    return set(range(len(transfers))) - set(failed)


def _mark_replicas(transfers: Sequence[Transfer], failed: dict[int, str], rank: int, fast: FastStore,
                   save_id: str) -> None:
    """A rebuilt replica is vouched for (marker) only when all of its files arrived."""
    by_dir: dict[str, list[tuple[int, Transfer]]] = {}
    for i, t in enumerate(transfers):
        if t.dst == rank and t.purpose is Purpose.REPLICA:
            by_dir.setdefault(t.dst_relpath.split("/")[0], []).append((i, t))
    for d, items in by_dir.items():
        if any(i in failed for i, _t in items):
            continue
        of_rank = replica_dir_rank(d)
        fast.sub(d).put_atomic(REPLICA_MARKER, json.dumps(
            {"save_id": save_id, "rank": of_rank, "files": {t.name: t.size for _i, t in items}}).encode())
        logger.info("rank %d: rebuilt the replica of rank %d (%d file(s)) in %s", rank, of_rank, len(items),
                    fast.path(d))


def verify_received(fast: FastStore, tmp_relpath: str, name: str, items: Sequence[tuple[Any, ItemLocation]],
                    rank: int, source: str, replica: str | None = None) -> str | None:
    """Check the received copy of data file ``name`` (still under ``tmp_relpath``) against the
    checksums of every item stored in it (:func:`~dcp_ext.verify.check_item`, what ``dcp-ext
    verify`` runs); None if it passes, else why not, naming the file, ``source`` (where the copy
    came from), the item and what failed (:func:`~dcp_ext.verify.damage_text`), and the
    ``replica`` directory it was to rebuild. Items saved without checksums cannot be checked."""
    unchecked = 0
    try:
        for idx, loc in sorted(items, key=lambda il: il[1].offset):
            if loc.checksums is None:
                unchecked += 1
                continue
            try:
                check_item(fast, loc, tmp_relpath)
            except (ChecksumMismatch, FrameDamaged) as e:
                return (f"rank {rank}: the copy of {name} received from {source} does not match the checkpoint's "
                        f"checksums: {damage_text(idx, e)}; it was not published"
                        + (f" and the replica it belongs to ({replica}) was not rebuilt" if replica else ""))
    except Exception as e:  # noqa: BLE001 - reported in the gathered outcome (peers wait for it)
        return f"rank {rank}: could not verify the copy of {name} received from {source}: {e}"
    finally:
        try:
            fast.close_readers()  # the temporary file is renamed or removed next
        except Exception as e:  # noqa: BLE001 - must not escape before the gathered outcome
            logger.warning("rank %d: closing the readers of %s failed: %s", rank, name, e)
    if unchecked:
        logger.debug("rank %d: %d item(s) of %s were saved without checksums: received unchecked", rank, unchecked,
                     name)
    return None
