"""Retrying object-store requests: exponential backoff with full jitter, then a clear error.

Object stores answer ``503 SlowDown`` when throttling, ``500``/``502``/``504`` when a node is
busy, and connections drop. Those are *transient*: the request is repeated after
``base_delay * 2**attempt`` seconds at most (a uniformly random fraction of it, "full
jitter", so that many ranks throttled together do not retry in lockstep), up to
``max_retries`` times. Anything else (wrong credentials, a missing bucket, a missing
object) fails at once. When the retries run out, :class:`~dcp_ext.errors.StorageError`
names the object and the last error.

The classification of an exception is the backend's (:attr:`RetryPolicy.is_transient`), since
every client library spells "throttled" differently.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from ..errors import StorageError

__all__ = ["RetryPolicy", "TRANSIENT_HTTP_STATUS", "is_network_error"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses that mean "try again": request timeout, throttling, server-side trouble
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_network_error(exc: BaseException) -> bool:
    """A dropped, reset, refused or timed-out connection (urllib3's or the standard library's):
    worth repeating whatever the backend."""
    import http.client
    import socket

    try:
        import urllib3.exceptions as ue

        if isinstance(exc, (ue.ProtocolError, ue.TimeoutError, ue.IncompleteRead, ue.SSLError,
                            ue.NewConnectionError, ue.MaxRetryError)):
            return True
    except ImportError:  # pragma: no cover - every backend's client brings urllib3
        pass
    return isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, http.client.IncompleteRead,
                            http.client.RemoteDisconnected))


@dataclass
class RetryPolicy:
    """How often and how patiently to repeat a transient failure.

    ``is_transient(exc)`` decides whether an exception is worth repeating; ``describe(exc)``
    turns it into the short text used in messages.
    """

    max_retries: int = 8
    base_delay: float = 0.2
    max_delay: float = 20.0
    is_transient: Callable[[BaseException], bool] = field(default=lambda e: False)
    describe: Callable[[BaseException], str] = field(default=lambda e: f"{type(e).__name__}: {e}")
    #: errors that are not transient are handed to this to become a clear error (or re-raised)
    translate: Callable[[BaseException, str], BaseException] | None = None
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): full jitter."""
        cap = min(self.max_delay, self.base_delay * (2 ** attempt))
        return random.uniform(0, cap)

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """``fn()``, repeated on transient errors; ``what`` names the object in messages.

        ``on_retry`` runs before each repeat (e.g. to rewind a stream or reset a partial read).
        """
        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                if not self.is_transient(e):
                    if self.translate is not None:
                        err = self.translate(e, what)
                        if err is e:
                            raise
                        raise err from e
                    raise
                if attempt >= self.max_retries:
                    raise StorageError(
                        f"{what} failed after {attempt + 1} attempt(s) ({self.max_retries} retries, "
                        f"max_retries): {self.describe(e)}") from e
                d = self.delay(attempt)
                logger.warning("%s: transient error (%s); retry %d/%d in %.2fs", what, self.describe(e),
                               attempt + 1, self.max_retries, d)
                attempt += 1
                self.sleep(d)
                if on_retry is not None:
                    on_retry()
