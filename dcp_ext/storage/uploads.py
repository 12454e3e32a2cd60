"""Streaming uploads of one object through bounded part buffers (what ``ObjectStore.open_writer``
returns): S3-style multipart uploads whose parts go up concurrently, and GCS-style resumable
uploads whose chunks go up in order; both take their buffers from the process-wide free list
(:mod:`dcp_ext.storage.buffers`), hold at most ``max_concurrency`` parts in flight per process,
and discard what they uploaded when they fail or are aborted.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import StorageError
from .base import BlobWriter
from .buffers import BUFFERS
from .threads import io_pool

if TYPE_CHECKING:
    from .object_store import ObjectStore

__all__ = ["IncompleteChunk", "MultipartUpload", "PartSlots", "ResumableUpload", "Upload"]

logger = logging.getLogger(__name__)


class PartSlots:
    """At most ``n`` parts in flight per (process, backend settings): bounds upload memory."""

    _all: ClassVar[dict[tuple, threading.BoundedSemaphore]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def get(cls, key: tuple, n: int) -> threading.BoundedSemaphore:
        with cls._lock:
            s = cls._all.get((key, n))
            if s is None:
                s = cls._all[(key, n)] = threading.BoundedSemaphore(n)
            return s


class Upload(BlobWriter):
    """Streams one object through ``part_size`` buffers from the process-wide free list; an
    object that fits in one buffer is a single PUT. Subclasses say what happens to a full
    buffer (:meth:`_buffer_full`), how the upload ends (:meth:`_finish`) and how a partial
    upload is discarded (:meth:`_stop`, :meth:`_discard_remote`)."""

    def __init__(self, store: "ObjectStore", key: str):
        self.store = store
        self.key = key
        self.part_size = store.part_size
        self.buf: bytearray | None = None
        self.fill = 0
        self.pos = 0  # bytes written by the caller
        self.closed = False

    # -- for subclasses ------------------------------------------------------------------
    def _started(self) -> bool:
        """Whether a multi-part upload has begun (else close() is one PUT)."""
        raise NotImplementedError

    def _buffer_full(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        """Wait for (or cancel) everything in flight; must not raise."""

    def _discard_remote(self) -> str:
        """Undo the started upload on the server; returns what was done, for the log."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n, off = len(mv), 0
        while off < n:
            if self.buf is None:
                self.buf = BUFFERS.get(self.part_size)
                self.fill = 0
            take = min(self.part_size - self.fill, n - off)
            self.buf[self.fill:self.fill + take] = mv[off:off + take]
            self.fill += take
            off += take
            if self.fill == self.part_size:
                self._buffer_full()
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def _take_buffer(self) -> tuple[bytearray | None, int]:
        buf, fill = self.buf, self.fill
        self.buf, self.fill = None, 0
        return buf, fill

    def _release_buffer(self) -> None:
        if self.buf is not None:
            BUFFERS.put(self.buf)
            self.buf = None

    def _submit(self, buf: bytearray | None, fn, *args) -> Future:
        """Run ``fn(*args)`` on the part pool, within the process-wide in-flight bound; ``buf``
        returns to the free list when it is done."""
        st = self.store
        slots = st.part_slots
        slots.acquire()  # blocks while max_concurrency parts are in flight: bounded memory
        try:
            fut = io_pool(f"{st.backend_name}-parts", st.max_concurrency).submit(fn, *args)
        except BaseException:
            slots.release()
            raise

        def done(f: Future) -> None:
            slots.release()
            if buf is not None:
                BUFFERS.put(buf)

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        if self.closed:
            return
        st = self.store
        try:
            if not self._started():  # small object: one PUT
                body = bytes(memoryview(self.buf)[:self.fill]) if self.buf is not None else b""
                self._release_buffer()
                st.retry.call(lambda: st._put_object(self.key, body), f"uploading {st.describe_key(self.key)}")
            else:
                self._finish()
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop()
        self._release_buffer()
        if self._started():
            what = self.store.describe_key(self.key)
            try:
                logger.info("%s the partial upload of %s", self._discard_remote(), what)
            except BaseException as e:  # noqa: BLE001 - abort must not raise
                logger.warning("could not discard the partial upload of %s: %s", what, e)


class MultipartUpload(Upload):
    """A parallel multipart upload: parts of exactly ``part_size`` bytes but the last, up to
    ``max_concurrency`` in flight per process, in any order."""

    def __init__(self, store: "ObjectStore", key: str):
        super().__init__(store, key)
        self.upload_id: str | None = None
        self.next_part = 1
        self.parts: dict[int, Any] = {}
        self.futures: list[Future] = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def _started(self) -> bool:
        return self.upload_id is not None

    def _buffer_full(self) -> None:
        self._send_part(final=False)

    def _send_part(self, final: bool) -> None:
        if self.error is not None:
            raise self.error
        st = self.store
        if self.upload_id is None:
            self.upload_id = st.retry.call(lambda: st._create_multipart(self.key),
                                           f"starting the multipart upload of {st.describe_key(self.key)}")
        number = self.next_part
        if number > st.max_parts:
            raise StorageError(
                f"{st.describe_key(self.key)} would need more than {st.max_parts} parts of {self.part_size} "
                f"bytes: raise {st.backend_name}.part_size, or spread the rank's data over more files "
                f"(files_per_rank)")
        self.next_part += 1
        buf, fill = self._take_buffer()
        if final and fill < len(buf):  # the last part: send just its bytes, recycle the buffer now
            body: Any = bytes(memoryview(buf)[:fill])
            BUFFERS.put(buf)
            buf = None
        else:
            body = buf
        self.futures.append(self._submit(buf, self._upload_part, number, body))

    def _upload_part(self, number: int, body) -> None:
        if self.error is not None:  # a sibling part failed: don't bother
            return
        st = self.store
        try:
            rec = st.retry.call(lambda: st._upload_part(self.key, self.upload_id, number, body),
                                f"uploading part {number} of {st.describe_key(self.key)}")
        except BaseException as e:  # noqa: BLE001 - raised by close()/write()
            with self.lock:
                if self.error is None:
                    self.error = e
            return
        with self.lock:
            self.parts[number] = rec

    def _finish(self) -> None:
        if self.fill:
            self._send_part(final=True)
        self._release_buffer()
        futs, self.futures = self.futures, []
        for f in futs:
            f.result()
        if self.error is not None:
            raise self.error
        st = self.store
        parts = [self.parts[k] for k in sorted(self.parts)]
        st.retry.call(lambda: st._complete_multipart(self.key, self.upload_id, parts, self.pos),
                      f"completing the upload of {st.describe_key(self.key)}")

    def _stop(self) -> None:
        if self.error is None:
            self.error = StorageError(f"the upload of {self.store.describe_key(self.key)} was aborted")
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - cancelled or failed: we are aborting anyway
                pass
        self.futures = []

    def _discard_remote(self) -> str:
        st = self.store
        st.retry.call(lambda: st._abort_multipart(self.key, self.upload_id),
                      f"aborting the upload of {st.describe_key(self.key)}")
        return "aborted"


class IncompleteChunk(ConnectionError):
    """The server kept fewer bytes of a resumable-upload chunk than were sent (transient: the
    rest is sent again from where the server stopped)."""


class ResumableUpload(Upload):
    """A resumable upload: ``part_size`` chunks sent in order, one in flight while the next one
    fills (GCS has no parallel multipart upload). A chunk that fails halfway is resumed from the
    byte the server reports having kept."""

    def __init__(self, store: "ObjectStore", key: str):
        super().__init__(store, key)
        self.sent = 0  # bytes handed to the upload (a multiple of the chunk size until the end)
        self.session: str | None = None
        self.pending: Future | None = None

    def _started(self) -> bool:
        return self.session is not None

    def _buffer_full(self) -> None:
        self._hand_off(total=None)

    def _wait_pending(self) -> None:
        if self.pending is not None:
            f, self.pending = self.pending, None
            f.result()

    def _hand_off(self, total: int | None) -> None:
        """Upload the filled buffer after the previous chunk (whose failure is raised here)."""
        st = self.store
        self._wait_pending()
        if self.session is None:
            self.session = st.retry.call(lambda: st._start_resumable(self.key),
                                         f"starting the upload of {st.describe_key(self.key)}")
        buf, fill = self._take_buffer()
        offset = self.sent
        self.sent += fill
        self.pending = self._submit(buf, self._send, buf, fill, offset, total)

    def _send(self, buf, fill: int, offset: int, total: int | None) -> None:
        st = self.store
        view = memoryview(buf)[:fill] if buf is not None else memoryview(b"")
        end = offset + fill
        state = {"at": offset}

        def attempt() -> None:
            at = state["at"]
            kept = st._put_chunk(self.session, at, view[at - offset:], total)
            state["at"] = max(at, min(kept, end))
            if kept < end:
                raise IncompleteChunk(f"the server kept {kept - offset} of {fill} bytes of the chunk at {offset}")

        def resync() -> None:  # where did the server stop? (an unanswerable question is retried)
            try:
                state["at"] = max(offset, min(end, st._resumable_status(self.session, total)))
            except Exception as e:  # noqa: BLE001 - the next attempt finds out again
                logger.debug("resumable upload status of %s: %s", st.describe_key(self.key), e)

        st.retry.call(attempt, f"uploading bytes {offset}-{end} of {st.describe_key(self.key)}", on_retry=resync)

    def _finish(self) -> None:
        # the last chunk (empty if the object ended on a chunk boundary) names the size
        self._hand_off(total=self.pos)
        self._wait_pending()

    def _stop(self) -> None:
        try:
            self._wait_pending()
        except BaseException:  # noqa: BLE001 - we are aborting anyway
            pass

    def _discard_remote(self) -> str:
        st = self.store
        st.retry.call(lambda: st._cancel_resumable(self.session), f"cancelling the upload of {st.describe_key(self.key)}")
        return "cancelled"
