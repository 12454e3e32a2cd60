"""Google Cloud Storage backend (``gs://bucket/prefix``), over the GCS JSON API.

We talk to the JSON API with urllib3 and google-auth (both come with ``pip install
'dcp-ext[gcs]'``) instead of going through gcsfs, for two reasons:

* **Uploads.** GCS has no S3-style multipart upload. By default each data file is one
  resumable upload (``part_size`` chunks in order, the next one filling while one is in flight;
  a chunk that fails halfway resumes from the byte the server kept), and a rank's files upload
  in parallel. With ``gcs.composite_uploads``, like ``gcloud storage``'s parallel composite
  uploads, a file is uploaded as ``part_size`` part objects, ``max_concurrency`` at a time,
  which one ``compose`` call (or a tree of them beyond 32 parts) joins into the final object;
  the parts are then deleted. A failed file cancels its session / deletes its parts.
* **One retry policy.** gcsfs repeats every failing request up to six times with its own
  backoff (about 30 s) before we would see it; here ``gcs.max_retries`` and
  ``gcs.retry_base_delay`` mean what they say, and the error names the object.

Credentials: ``gcs.token`` = None uses application-default credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, the metadata
server) against Google, and none against an emulator (``gcs.endpoint_url`` or
``STORAGE_EMULATOR_HOST``); ``"anon"`` sends no credentials; a path names a service-account
or authorized-user JSON key; ``"google_default"`` forces application-default credentials.
Tokens are never logged nor written into a checkpoint. Stock ``FsspecWriter``/``FsspecReader``
with gcsfs read and write the same files.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from ..config import Config
from ..options import ByteSize
from ..errors import BucketNotFoundError, ConfigError, MissingDependencyError, StorageAuthError, StorageError
from .object_store import NotFound, ObjectStore, ObjectStoreOptions, RangeNotSatisfiable
from .retry import TRANSIENT_HTTP_STATUS, is_network_error
from .threads import run_all

__all__ = ["GCSOptions", "GCSStore", "GCSHTTPError"]

logger = logging.getLogger(__name__)


@dataclass
class GCSOptions(ObjectStoreOptions):
    """The ``[gcs]`` section (JSON API). Application-default credentials unless a token is given."""

    project: str | None = None
    #: None (application-default credentials; anonymous for an emulator), "anon", the path
    #: of a service-account JSON key, or "google_default"
    token: str | None = field(default=None, repr=False)
    #: emulator / custom endpoint; default: ``STORAGE_EMULATOR_HOST`` when set, else Google's
    endpoint_url: str | None = None
    #: chunk size of resumable uploads (a multiple of 256 KiB), or part size with composite uploads
    part_size: ByteSize = ByteSize(16 * 1024 * 1024)
    #: upload a large file as parallel part objects composed at the end (like gcloud's parallel
    #: composite uploads) instead of one resumable upload: faster for one huge file on real GCS,
    #: but costs extra operations, and emulators copy the data again to compose it
    composite_uploads: bool = False
    #: seconds to wait for a connection / for data before a request counts as dropped
    timeout: float = 60.0

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.part_size < 256 * 1024 or self.part_size % (256 * 1024):
            raise ConfigError(f"{section}.part_size: must be a multiple of 256 KiB (GCS resumable uploads), got "
                              f"{self.part_size}")
        if self.timeout <= 0:
            raise ConfigError(f"{section}.timeout: must be > 0 seconds, got {self.timeout}")

GOOGLE_ENDPOINT = "https://storage.googleapis.com"
_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
#: a composite object may have at most 1024 components, and one compose joins 32 objects
_COMPOSE_FANIN = 32
_PART_TAG = ".dcp_ext-part."
_AUTH_HINT = ("check gcs.token (a service-account JSON key, 'google_default' or 'anon'), "
              "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`, and gcs.endpoint_url / "
              "STORAGE_EMULATOR_HOST")


class GCSHTTPError(Exception):
    """A GCS JSON API request answered with an HTTP error status."""

    def __init__(self, status: int, message: str, method: str, what: str):
        self.status, self.message = status, message
        super().__init__(f"HTTP {status} for {method} {what}: {message}")


def _endpoint(opts) -> str:
    ep = opts.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or GOOGLE_ENDPOINT
    if "://" not in ep:
        ep = "http://" + ep
    return ep.rstrip("/")


class _Auth:
    """Bearer tokens from google-auth credentials, refreshed under a lock; or nothing (anon)."""

    def __init__(self, token: str | None, endpoint: str):
        self.creds = None
        self.lock = threading.Lock()
        emulator = endpoint != GOOGLE_ENDPOINT
        if token == "anon" or (token is None and emulator):
            return
        try:
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests
        except ImportError as e:
            raise MissingDependencyError("the 'gcs' backend needs google-auth: pip install 'dcp-ext[gcs]'") from e
        try:
            if token in (None, "google_default"):
                self.creds, _ = google.auth.default(scopes=_SCOPES)
            elif os.path.isfile(os.path.expanduser(token)):
                self.creds = _key_file_credentials(os.path.expanduser(token))
            else:
                raise StorageAuthError(f"gcs.token must be None, 'anon', 'google_default' or the path of a JSON key "
                                       f"file; {token[:4]!r}... is none of these (and no such file exists)")
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise StorageAuthError(f"no Google credentials were found ({e}); {_AUTH_HINT}") from e
        self._request = google.auth.transport.requests.Request()

    def headers(self) -> dict[str, str]:
        if self.creds is None:
            return {}
        with self.lock:
            if not self.creds.valid:
                try:
                    self.creds.refresh(self._request)
                except Exception as e:  # noqa: BLE001 - google.auth raises several types
                    raise StorageAuthError(f"refreshing the Google credentials failed ({type(e).__name__}); "
                                           f"{_AUTH_HINT}") from e
            return {"Authorization": f"Bearer {self.creds.token}"}


def _key_file_credentials(path: str) -> Any:
    """Credentials from a service-account or authorized-user JSON key file, and nothing else.

    Not ``google.auth.load_credentials_from_file``: it also accepts external-account
    configurations, which can name a program to run to get a token (google-auth deprecates it
    for files from untrusted sources); a key file must never make us execute anything.
    """
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise StorageAuthError(f"gcs.token: cannot read the JSON key file {path}: {e}") from e
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_info(info, scopes=_SCOPES)
        if kind == "authorized_user":
            from google.oauth2 import credentials

            return credentials.Credentials.from_authorized_user_info(info, scopes=_SCOPES)
    except ValueError as e:  # a key file missing fields or with a malformed private key
        raise StorageAuthError(f"gcs.token: {path} is not a valid {kind} key file: {e}") from e
    raise StorageAuthError(f"gcs.token: {path} holds credentials of type {kind!r}; only 'service_account' and "
                           f"'authorized_user' JSON key files are accepted (use 'google_default' for others)")


_SHARED: dict[tuple, tuple[Any, _Auth]] = {}
_SHARED_LOCK = threading.Lock()


def _client(config: Config) -> tuple[Any, _Auth, str]:
    """The process-wide (connection pool, credentials, endpoint) for ``config.gcs``."""
    opts = config.gcs
    ep = _endpoint(opts)
    key = (os.getpid(), ep, opts.token, opts.timeout, config.io_threads, opts.max_concurrency)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is None:
            try:
                import urllib3
            except ImportError as e:  # pragma: no cover - botocore/requests bring it
                raise MissingDependencyError("the 'gcs' backend needs urllib3: pip install 'dcp-ext[gcs]'") from e
            pool = urllib3.PoolManager(maxsize=max(16, config.io_threads + opts.max_concurrency + 4), block=False,
                                       retries=False, timeout=urllib3.Timeout(connect=min(10.0, opts.timeout),
                                                                              read=opts.timeout))
            hit = _SHARED[key] = (pool, _Auth(opts.token, ep))
            logger.debug("created a GCS client for %s", ep)
    return hit[0], hit[1], ep


def _forget_in_child() -> None:
    global _SHARED_LOCK
    _SHARED.clear()
    _SHARED_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class GCSStore(ObjectStore):
    """A checkpoint under ``gs://BUCKET/PREFIX``."""

    schemes = ("gs", "gcs")
    backend_name = "gcs"
    max_parts = 1024
    _unpicklable = ("_conn",)

    def __init__(self, url: str, config: Config | None = None):
        super().__init__(url, config)
        self._conn = None

    def _c(self) -> tuple[Any, _Auth, str]:
        c = getattr(self, "_conn", None)
        if c is None:
            c = self._conn = _client(self.config)
        return c

    # -- HTTP --------------------------------------------------------------------------
    def _o(self, key: str) -> str:
        return f"/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"

    def _request(self, method: str, path: str, what: str, *, params: dict | None = None, body: Any = None,
                 headers: dict | None = None, stream: bool = False, ok404: bool = False):
        pool, auth, ep = self._c()
        url = ep + path + (("?" + urlencode(params)) if params else "")
        h = auth.headers()
        if headers:
            h.update(headers)
        r = pool.request(method, url, body=body, headers=h, preload_content=not stream, redirect=False)
        if r.status >= 400:
            if r.status == 404 and ok404:
                if stream:
                    r.drain_conn()
                    r.release_conn()
                return None
            raw = r.data if not stream else r.read()
            if stream:
                r.release_conn()
            try:
                err = json.loads(raw or b"{}").get("error")
                msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
            except (ValueError, AttributeError):
                msg = (raw or b"")[:200].decode(errors="replace")
            raise GCSHTTPError(r.status, msg or http.client.responses.get(r.status, ""), method, what)
        return r

    def _json(self, r) -> dict:
        return json.loads(r.data or b"{}")

    # -- error classification ------------------------------------------------------------
    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, GCSHTTPError):
            return exc.status in TRANSIENT_HTTP_STATUS
        try:
            import google.auth.exceptions as ge

            if isinstance(exc, ge.TransportError):
                return True
        except ImportError:  # pragma: no cover - the backend requires google-auth
            pass
        return is_network_error(exc)

    def _translate(self, exc: BaseException, what: str) -> BaseException:
        if isinstance(exc, GCSHTTPError):
            if exc.status in (401, 403):
                return StorageAuthError(f"{what}: the GCS server refused the request (HTTP {exc.status}: "
                                        f"{exc.message}); {_AUTH_HINT}")
            if exc.status == 404 and "bucket" in exc.message.lower():
                return BucketNotFoundError(f"{what}: the bucket gs://{self.bucket} does not exist")
            return StorageError(f"{what}: HTTP {exc.status}: {exc.message}")
        return exc

    # -- primitives ----------------------------------------------------------------------
    def _check_bucket(self) -> None:
        def probe() -> None:
            r = self._request("GET", f"/storage/v1/b/{quote(self.bucket, safe='')}", f"gs://{self.bucket}",
                              params={"fields": "name"}, ok404=True)
            if r is None:
                raise BucketNotFoundError(f"cannot use gs://{self.bucket}/{self.prefix}: the bucket "
                                          f"{self.bucket!r} does not exist")
            # listing needs its own permission (we list to find incomplete checkpoints)
            self._list(self._dir_prefix(), 1)

        self.retry.call(probe, f"checking access to gs://{self.bucket}/{self.prefix}")

    def _put_object(self, key: str, data) -> None:
        r = self._request("POST", f"/upload/storage/v1/b/{quote(self.bucket, safe='')}/o", self.describe_key(key),
                          params={"uploadType": "media", "name": key}, body=data,
                          headers={"Content-Type": "application/octet-stream"}, ok404=True)
        if r is None:
            raise BucketNotFoundError(f"writing {self.describe_key(key)}: the bucket gs://{self.bucket} does not exist")

    # -- resumable uploads (the default way to stream a large object) ---------------------
    def resumable_uploads(self) -> bool:
        return not self.config.gcs.composite_uploads

    def _start_resumable(self, key: str) -> str:
        r = self._request("POST", f"/upload/storage/v1/b/{quote(self.bucket, safe='')}/o", self.describe_key(key),
                          params={"uploadType": "resumable", "name": key}, body=b"{}",
                          headers={"Content-Type": "application/json; charset=UTF-8",
                                   "X-Upload-Content-Type": "application/octet-stream"}, ok404=True)
        if r is None:
            raise BucketNotFoundError(f"writing {self.describe_key(key)}: the bucket gs://{self.bucket} does not exist")
        loc = r.headers.get("Location")
        if not loc:
            raise StorageError(f"starting the upload of {self.describe_key(key)}: the server sent no session URI")
        # the session's path and query, on *our* endpoint (an emulator names its external URL,
        # which may not be the address we reach it by, e.g. through a proxy)
        u = urlsplit(loc)
        return u.path + ("?" + u.query if u.query else "")

    def _session_request(self, session: str, headers: dict, body: Any, what: str):
        pool, auth, ep = self._c()
        h = auth.headers()
        h.update(headers)
        r = pool.request("PUT", ep + session, body=body, headers=h, redirect=False)
        if r.status in (200, 201, 308):
            return r
        try:
            err = json.loads(r.data or b"{}").get("error")
            msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
        except (ValueError, AttributeError):
            msg = (r.data or b"")[:200].decode(errors="replace")
        if r.status in (404, 410):
            raise StorageError(f"{what}: the upload session expired or was cancelled (HTTP {r.status}: {msg})")
        raise GCSHTTPError(r.status, msg or http.client.responses.get(r.status, ""), "PUT", what)

    @staticmethod
    def _kept(r) -> int:
        """Bytes the server holds, from a 308's ``Range: bytes=0-N`` (none: nothing yet)."""
        rng = r.headers.get("Range")
        if not rng:
            return 0
        return int(rng.rsplit("-", 1)[1]) + 1

    def _put_chunk(self, session: str, offset: int, data: memoryview, total: int | None) -> int:
        n = len(data)
        if n:
            crange = f"bytes {offset}-{offset + n - 1}/{'*' if total is None else total}"
        else:
            crange = f"bytes */{total}"
        # urllib3 sends any buffer as it is: the chunk goes out of our part buffer without a copy
        r = self._session_request(session, {"Content-Range": crange, "Content-Length": str(n)},
                                  data if n else b"", f"uploading to {session[:60]}")
        if r.status in (200, 201):
            return offset + n if total is None else total
        return self._kept(r)

    def _resumable_status(self, session: str, total: int | None) -> int:
        r = self._session_request(session, {"Content-Range": f"bytes */{'*' if total is None else total}",
                                            "Content-Length": "0"}, b"", f"querying {session[:60]}")
        if r.status in (200, 201):
            return total if total is not None else 1 << 62
        return self._kept(r)

    def _cancel_resumable(self, session: str) -> None:
        pool, auth, ep = self._c()
        pool.request("DELETE", ep + session, headers=auth.headers(), redirect=False)

    # -- parallel composite uploads (gcs.composite_uploads = true) --------------------------
    def _create_multipart(self, key: str) -> str:
        return uuid.uuid4().hex[:16]

    def _part_key(self, key: str, upload_id: str, name: str) -> str:
        return f"{key}{_PART_TAG}{upload_id}.{name}"

    def _upload_part(self, key: str, upload_id: str, number: int, body) -> Any:
        pk = self._part_key(key, upload_id, f"{number:05d}")
        self._put_object(pk, body)
        return pk

    def _compose(self, dest: str, sources: list[str]) -> None:
        doc = {"kind": "storage#composeRequest", "sourceObjects": [{"name": s} for s in sources],
               "destination": {"contentType": "application/octet-stream"}}
        self._request("POST", self._o(dest) + "/compose", self.describe_key(dest), body=json.dumps(doc).encode(),
                      headers={"Content-Type": "application/json"})

    def _complete_multipart(self, key: str, upload_id: str, parts: list, size: int) -> None:
        level, temps, srcs = 0, [], list(parts)
        while len(srcs) > _COMPOSE_FANIN:  # a tree of composes; each level joins 32 objects
            nxt = []
            for i in range(0, len(srcs), _COMPOSE_FANIN):
                t = self._part_key(key, upload_id, f"c{level}-{i // _COMPOSE_FANIN:04d}")
                self.retry.call(lambda t=t, i=i: self._compose(t, srcs[i:i + _COMPOSE_FANIN]),
                                f"composing {self.describe_key(t)}")
                nxt.append(t)
            temps.extend(nxt)
            srcs, level = nxt, level + 1
        self._compose(key, srcs)
        try:
            self._delete(list(parts) + temps)
        except Exception as e:  # noqa: BLE001 - the object is complete; parts are only clutter
            logger.warning("could not delete the part objects of %s: %s", self.describe_key(key), e)

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        self._delete(self._list(f"{key}{_PART_TAG}{upload_id}."))

    def _open_range(self, key: str, start: int, end: int | None):
        try:
            r = self._request("GET", self._o(key), self.describe_key(key), params={"alt": "media"},
                              headers=None if end is None else {"Range": f"bytes={start}-{end - 1}"},
                              stream=True, ok404=True)
        except GCSHTTPError as e:
            if e.status == 416:
                raise RangeNotSatisfiable(key) from e
            raise
        if r is None:
            raise NotFound(key)
        if r.status == 200 and end is not None and start > 0:  # the server ignored the range: don't misread from byte 0
            r.release_conn()
            raise StorageError(f"{self.describe_key(key)}: the server ignored the Range header")
        length = r.headers.get("Content-Length")
        if length is None and end is None:
            r.release_conn()
            raise StorageError(f"{self.describe_key(key)}: the server sent no Content-Length")
        return r, (int(length) if length is not None else end - start)

    def _head(self, key: str) -> int:
        r = self._request("GET", self._o(key), self.describe_key(key), params={"fields": "size"}, ok404=True)
        if r is None:
            raise NotFound(key)
        return int(self._json(r)["size"])

    def _list(self, prefix: str, limit: int | None = None) -> list[str]:
        keys: list[str] = []
        params: dict[str, Any] = {"prefix": prefix, "fields": "items(name),nextPageToken"}
        while True:
            params["maxResults"] = 1000 if limit is None else max(1, min(1000, limit - len(keys)))
            r = self._request("GET", f"/storage/v1/b/{quote(self.bucket, safe='')}/o",
                              f"gs://{self.bucket}/{prefix}", params=params, ok404=True)
            if r is None:
                raise BucketNotFoundError(f"listing gs://{self.bucket}/{prefix}: the bucket gs://{self.bucket} "
                                          f"does not exist")
            doc = self._json(r)
            keys.extend(o["name"] for o in doc.get("items", []))
            tok = doc.get("nextPageToken")
            if (limit is not None and len(keys) >= limit) or not tok:
                return keys[:limit] if limit is not None else keys
            params["pageToken"] = tok

    def _delete(self, keys: list[str]) -> None:
        def one(k: str) -> None:
            self.retry.call(lambda: self._request("DELETE", self._o(k), self.describe_key(k), ok404=True),
                            f"deleting {self.describe_key(k)}")

        run_all("gcs-delete", min(8, self.max_concurrency), one, [(k,) for k in keys])

    # -- housekeeping ----------------------------------------------------------------------
    def incomplete_uploads(self) -> list[str]:
        """Part objects of uploads that never completed (left by a killed process)."""
        return [k for k in self._list_keys() if _PART_TAG in k]

    def abort_incomplete_uploads(self) -> int:
        """Delete every leftover part object under this prefix; returns how many."""
        junk = self.incomplete_uploads()
        if junk:
            self._delete(junk)
            logger.info("deleted %d leftover part object(s) under gs://%s/%s", len(junk), self.bucket, self.prefix)
        return len(junk)
