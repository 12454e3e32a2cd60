"""Moving objects and files between ranks over a side gloo group, in bounded memory.

Files travel in ``tier.chunk_size`` messages (one buffer each way), read from and written to the
fast tier's :class:`~dcp_ext.tiered.faststore.FastStore`; a received file appears under its
name only when complete. A failed read on the sending side does not stop the exchange (the
peer would wait for bytes that never come): zeros are sent instead and the error is reported
afterwards, so both sides stay in step and the agreement that follows refuses the result.
Collective failures (a peer died, hung past ``tier.exchange_timeout``, unreachable) become
:class:`~dcp_ext.errors.PeerLostError` naming the exchange.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import torch

from ..errors import PeerLostError, StorageError
from .faststore import AtomicFile, FastStore
from .topology import abandon_group

__all__ = ["gather", "broadcast", "barrier", "collective", "FileSource", "FileSink", "stream_files"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def collective(what: str, group: Any) -> Iterator[None]:
    """Turn a failing collective into a :class:`PeerLostError` that says which exchange failed."""
    try:
        yield
    except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out", DistBackendError
        import torch.distributed as dist

        rank = dist.get_rank()
        abandon_group(group)  # the next writer/reader makes a new group (gloo ignores the abort)
        err = PeerLostError(
            f"rank {rank}: the tiered exchange '{what}' failed: another rank died, is unreachable, "
            f"or did not answer within tier.exchange_timeout ({type(e).__name__}: {e})")
        # logged too: DCP's own collective that follows may fail with a message of its own
        logger.error("%s", err)
        raise err from e


def gather(obj: Any, group: Any, what: str) -> list[Any]:
    """``all_gather_object`` on ``group``: every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    with collective(what, group):
        dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Any, what: str) -> None:
    """Every rank of ``group`` has reached this point."""
    import torch.distributed as dist

    with collective(what, group):
        dist.barrier(group=group)


def broadcast(obj: Any, src: int, group: Any, what: str) -> Any:
    """``broadcast_object_list`` of one object from ``src``."""
    import torch.distributed as dist

    box = [obj]
    with collective(what, group):
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class FileSource:
    """Reads a list of fast-tier files as one byte stream (zeros after a read error)."""

    def __init__(self, store: FastStore, files: list[tuple[str, int]]):
        self.store = store
        self.items = files
        self.i = 0
        self.pos = 0
        self.error: BaseException | None = None

    def fill(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            relpath, size = self.items[self.i]
            if self.pos >= size:
                self.i += 1
                self.pos = 0
                continue
            take = min(len(buf) - got, size - self.pos)
            try:
                if self.error is not None:
                    raise self.error
                self.store.read_into(relpath, self.pos, buf[got:got + take])
            except (OSError, StorageError) as e:  # keep the exchange in step; reported after
                self.error = self.error or e
                buf[got:got + take] = bytes(take)
            got += take
            self.pos += take

    def close(self) -> None:
        self.store.close_readers()


class FileSink:
    """Writes one byte stream into a list of fast-tier files (each published when complete)."""

    def __init__(self, store: FastStore, files: list[tuple[str, int]], publish: bool = True):
        self.store = store
        self.items = list(files)
        self.publish_each = publish
        self.i = 0
        self.pos = 0
        self.cur: AtomicFile | None = None
        self.error: BaseException | None = None
        #: files completely received (published, or finished awaiting :meth:`publish`)
        self.done: list[AtomicFile] = []
        self._advance_empty()

    def _open(self) -> AtomicFile | None:
        if self.error is None and self.cur is None:
            try:
                self.cur = self.store.open_atomic(self.items[self.i][0])
            except (OSError, StorageError) as e:
                self.error = e
        return self.cur

    def _complete(self) -> None:
        f = self._open()
        self.cur = None
        if f is None:
            return
        try:
            f.publish() if self.publish_each else f.finish()
            self.done.append(f)
        except (OSError, StorageError) as e:
            self.error = self.error or e
            f.abort()

    def _advance_empty(self) -> None:
        while self.i < len(self.items) and self.items[self.i][1] == 0:
            self._complete()
            self.i += 1

    def write(self, data: memoryview) -> None:
        got = 0
        while got < len(data):
            _name, size = self.items[self.i]
            take = min(len(data) - got, size - self.pos)
            f = self._open()
            if f is not None:
                try:
                    f.write(data[got:got + take])
                except (OSError, StorageError) as e:
                    self.error = e
                    f.abort()
                    self.cur = None
            got += take
            self.pos += take
            if self.pos == size:
                self._complete()
                self.i += 1
                self.pos = 0
                self._advance_empty()

    def abort(self) -> None:
        """Discard everything received (files not yet published, and the one in progress)."""
        if self.cur is not None:
            self.cur.abort()
        for f in self.done:
            f.abort()


def stream_files(source: FileSource | None, dst: int, sink: FileSink | None, src: int, group: Any,
                 chunk: int, what: str) -> None:
    """Send ``source`` to rank ``dst`` while receiving ``sink`` from rank ``src`` (either may be
    None), ``chunk`` bytes per message each way."""
    import torch.distributed as dist

    total_out = sum(s for _, s in source.items) if source else 0
    total_in = sum(s for _, s in sink.items) if sink else 0
    n_out, n_in = math.ceil(total_out / chunk), math.ceil(total_in / chunk)
    sbuf = torch.empty(min(chunk, total_out), dtype=torch.uint8)
    rbuf = torch.empty(min(chunk, total_in), dtype=torch.uint8)
    smv = memoryview(sbuf.numpy()).cast("B") if sbuf.numel() else None
    rmv = memoryview(rbuf.numpy()).cast("B") if rbuf.numel() else None
    try:
        with collective(what, group):
            for i in range(max(n_out, n_in)):
                works = []
                if i < n_out:
                    k = min(chunk, total_out - i * chunk)
                    source.fill(smv[:k])
                    works.append(dist.isend(sbuf[:k], dst, group=group))
                k_in = 0
                if i < n_in:
                    k_in = min(chunk, total_in - i * chunk)
                    works.append(dist.irecv(rbuf[:k_in], src, group=group))
                for w in works:
                    w.wait()
                if k_in:
                    sink.write(rmv[:k_in])
    except BaseException:
        if sink is not None:
            sink.abort()  # no half-received file stays behind
        raise
    finally:
        if source is not None:
            source.close()
