"""S3 backend (``s3://bucket/prefix``): any S3-compatible store (AWS, MinIO, SeaweedFS, ...).

Built on botocore rather than s3fs: botocore clients are thread-safe and
release the GIL while hashing and sending, so the generic :class:`ObjectStore` can run
``max_concurrency`` part uploads and ``io_threads`` ranged GETs in plain threads, and it lets
us own the retry policy (botocore's own retries are switched off, so ``s3.max_retries`` means
what it says). s3fs remains the way to use stock ``FsspecWriter``/``FsspecReader`` on S3,
and those read and write the same files as we do.

Credentials and endpoint follow the AWS conventions: explicit options
(``s3.access_key_id``/``secret_access_key``/``session_token``, ``s3.profile``,
``s3.endpoint_url``, ``s3.region``) win; otherwise botocore's chain applies
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws/credentials`` and ``~/.aws/config``, instance roles), ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for the endpoint and ``AWS_REGION``/``AWS_DEFAULT_REGION`` for the
region. Secrets are never logged, never part of ``repr(config)``, never written into a
checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import BucketNotFoundError, ConfigError, StorageAuthError, StorageError
from .object_store import NotFound, ObjectStore, ObjectStoreOptions, RangeNotSatisfiable
from .retry import TRANSIENT_HTTP_STATUS, is_network_error

__all__ = ["S3Options", "S3Store", "s3_client"]

logger = logging.getLogger(__name__)


@dataclass
class S3Options(ObjectStoreOptions):
    """The ``[s3]`` section (botocore). Credentials, endpoint and region follow the AWS conventions
    (``AWS_*`` environment variables, ``~/.aws`` files, instance roles) unless given here."""

    #: e.g. ``http://127.0.0.1:9000`` for MinIO; default: ``AWS_ENDPOINT_URL(_S3)`` or AWS
    endpoint_url: str | None = None
    #: default: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's region, ``us-east-1``
    region: str | None = None
    #: a named profile of ``~/.aws/config`` / ``~/.aws/credentials`` (default: ``AWS_PROFILE``)
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: ``"path"`` or ``"virtual"`` bucket addressing (default: botocore's choice)
    addressing_style: str | None = None
    #: extra ``botocore.config.Config`` keyword arguments (e.g. ``{"read_timeout": 120}``)
    client_config: dict = field(default_factory=dict)

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.part_size < 5 * 1024 * 1024:
            raise ConfigError(f"{section}.part_size: must be >= 5MiB (S3 minimum), got {self.part_size}")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ConfigError(f"{section}.addressing_style: must be 'path', 'virtual' or 'auto', got "
                              f"{self.addressing_style!r}")

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "503", "500", "502", "504",
})
_AUTH_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
    "AllAccessDisabled", "AccountProblem", "401",
})
_AUTH_HINT = ("check the credentials (s3.access_key_id / s3.secret_access_key / s3.profile, or "
              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the endpoint (s3.endpoint_url "
              "or AWS_ENDPOINT_URL)")

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _region(opts, session) -> str:
    return (opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            or session.get_config_variable("region") or "us-east-1")


def s3_client(config: Config):
    """The (cached, thread-safe) botocore S3 client for ``config.s3``'s settings.

    One client per process and settings: building one costs tens of milliseconds, and its
    connection pool is what keeps TCP connections warm between checkpoints.
    """
    opts = config.s3
    key_material = (os.getpid(), opts.endpoint_url, opts.region, opts.profile, opts.access_key_id,
                    opts.secret_access_key, opts.session_token, opts.addressing_style,
                    repr(sorted(opts.client_config.items())), config.io_threads, opts.max_concurrency,
                    os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"),
                    os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION"),
                    os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ACCESS_KEY_ID"))
    # the secrets take part in the cache key only as a digest
    key = (hashlib.sha256(repr(key_material).encode()).hexdigest(),)
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(key)
        if c is not None:
            return c
        import botocore.config
        import botocore.exceptions
        import botocore.session

        session = botocore.session.Session(profile=opts.profile) if opts.profile else botocore.session.Session()
        try:
            region = _region(opts, session)
        except botocore.exceptions.ProfileNotFound as e:
            raise StorageAuthError(f"the AWS profile {opts.profile!r} (s3.profile) is not defined in the AWS "
                                   f"config files") from e
        kwargs: dict[str, Any] = {
            "region_name": region,
            # our RetryPolicy repeats transient failures (s3.max_retries): no retries inside botocore
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": max(16, config.io_threads + opts.max_concurrency + 4),
            "connect_timeout": 10,
            "read_timeout": 60,
            "tcp_keepalive": True,
        }
        # botocore >= 1.36 adds a CRC32 of every body by default; our crc32c blocks (and SigV4's
        # SHA-256 on plain HTTP, TLS on HTTPS) already cover the bytes: skip the extra pass
        for k in ("request_checksum_calculation", "response_checksum_validation"):
            if k in botocore.config.Config.OPTION_DEFAULTS:
                kwargs[k] = "when_required"
        if opts.addressing_style:
            kwargs["s3"] = {"addressing_style": opts.addressing_style}
        kwargs.update(opts.client_config)
        try:
            bcfg = botocore.config.Config(**kwargs)
        except TypeError as e:
            raise StorageError(f"s3.client_config: {e}") from e
        ckw: dict[str, Any] = {"config": bcfg}
        if opts.endpoint_url:
            ckw["endpoint_url"] = opts.endpoint_url
        if opts.access_key_id or opts.secret_access_key:
            if not (opts.access_key_id and opts.secret_access_key):
                raise StorageAuthError("s3.access_key_id and s3.secret_access_key must be given together")
            ckw.update(aws_access_key_id=opts.access_key_id, aws_secret_access_key=opts.secret_access_key,
                       aws_session_token=opts.session_token)
        try:
            c = session.create_client("s3", **ckw)
        except botocore.exceptions.ProfileNotFound as e:
            raise StorageAuthError(f"the AWS profile {opts.profile!r} (s3.profile) is not defined in the AWS "
                                   f"config files") from e
        _CLIENTS[key] = c
        logger.debug("created an S3 client (endpoint %s, region %s)", c.meta.endpoint_url, c.meta.region_name)
        return c


def _forget_clients_in_child() -> None:
    global _CLIENTS_LOCK
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_in_child)


def _error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code", ""))
    status = int((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Store(ObjectStore):
    """A checkpoint under ``s3://BUCKET/PREFIX``."""

    schemes = ("s3", "s3a")
    backend_name = "s3"
    max_parts = 10000
    _unpicklable = ("_client_obj",)

    def __init__(self, url: str, config: Config | None = None):
        super().__init__(url, config)
        self._client_obj = None

    @property
    def client(self):
        c = getattr(self, "_client_obj", None)
        if c is None:
            c = self._client_obj = s3_client(self.config)
        return c

    # -- error classification ------------------------------------------------------------
    def _is_transient(self, exc: BaseException) -> bool:
        import botocore.exceptions as be

        if isinstance(exc, be.ClientError):
            code, status = _error_code(exc)
            return code in _TRANSIENT_CODES or status in TRANSIENT_HTTP_STATUS
        if isinstance(exc, (be.HTTPClientError, be.IncompleteReadError, be.ResponseStreamingError,
                            be.ConnectionError)):
            return True
        return is_network_error(exc)

    def _describe(self, exc: BaseException) -> str:
        import botocore.exceptions as be

        if isinstance(exc, be.ClientError):
            code, status = _error_code(exc)
            msg = (exc.response.get("Error") or {}).get("Message", "")
            return f"{code or status} ({status}){': ' + msg if msg else ''}"
        return f"{type(exc).__name__}: {exc}"

    def _translate(self, exc: BaseException, what: str) -> BaseException:
        import botocore.exceptions as be

        where = f"s3://{self.bucket}"
        if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
            return StorageAuthError(f"{what}: no usable AWS credentials were found ({exc}); {_AUTH_HINT}")
        if isinstance(exc, be.ClientError):
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                return BucketNotFoundError(f"{what}: the bucket {where} does not exist")
            if code in _AUTH_CODES or status in (401, 403):
                return StorageAuthError(f"{what}: the S3 server refused the request ({self._describe(exc)}); "
                                        f"{_AUTH_HINT}")
            return StorageError(f"{what}: {self._describe(exc)}")
        if isinstance(exc, (be.BotoCoreError,)):
            return StorageError(f"{what}: {type(exc).__name__}: {exc}")
        return exc

    # -- primitives ----------------------------------------------------------------------
    def _check_bucket(self) -> None:
        import botocore.exceptions as be

        def probe() -> None:
            try:
                self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(), MaxKeys=1)
            except be.ClientError as e:
                code, status = _error_code(e)
                if code == "NoSuchBucket" or (status == 404 and code in ("404", "NotFound")):
                    raise BucketNotFoundError(f"cannot use s3://{self.bucket}/{self.prefix}: the bucket "
                                              f"{self.bucket!r} does not exist") from e
                raise

        self.retry.call(probe, f"checking access to s3://{self.bucket}/{self.prefix}")

    def _put_object(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _create_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def _upload_part(self, key: str, upload_id: str, number: int, body) -> Any:
        r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": r["ETag"]}

    def _complete_multipart(self, key: str, upload_id: str, parts: list, size: int) -> None:
        import botocore.exceptions as be

        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except be.ClientError as e:
            # A retried Complete whose first attempt succeeded (the answer was lost) finds the
            # upload gone: the object is there, with the size we wrote.
            if _error_code(e)[0] == "NoSuchUpload":
                try:
                    if self._head(key) == size:
                        return
                except NotFound:
                    pass
            raise

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        import botocore.exceptions as be

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except be.ClientError as e:
            if _error_code(e)[0] != "NoSuchUpload":
                raise

    def _open_range(self, key: str, start: int, end: int | None):
        import botocore.exceptions as be

        try:
            kw = {} if end is None else {"Range": f"bytes={start}-{end - 1}"}
            r = self.client.get_object(Bucket=self.bucket, Key=key, **kw)
        except be.ClientError as e:
            code, status = _error_code(e)
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                raise NotFound(key) from e
            if code == "InvalidRange" or status == 416:
                raise RangeNotSatisfiable(key) from e
            raise
        body = r["Body"]
        # urllib3's response under botocore's StreamingBody: readinto straight into our buffer
        return getattr(body, "_raw_stream", body), int(r["ContentLength"])

    def _head(self, key: str) -> int:
        import botocore.exceptions as be

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except be.ClientError as e:
            code, status = _error_code(e)
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise NotFound(key) from e
            raise

    def _list(self, prefix: str, limit: int | None = None) -> list[str]:
        keys: list[str] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            if limit is not None:
                kw["MaxKeys"] = max(1, min(1000, limit - len(keys)))
            r = self.client.list_objects_v2(**kw)
            keys.extend(o["Key"] for o in r.get("Contents", []))
            if (limit is not None and len(keys) >= limit) or not r.get("IsTruncated"):
                return keys[:limit] if limit is not None else keys
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            r = self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errs = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errs:
                e = errs[0]
                raise StorageError(f"deleting s3://{self.bucket}/{e.get('Key')} failed: {e.get('Code')} "
                                   f"{e.get('Message', '')} ({len(errs)} object(s) not deleted)")

    # -- housekeeping ----------------------------------------------------------------------
    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """``(key, upload_id)`` of multipart uploads under this prefix that were never completed
        (left by a process that was killed mid-upload; a failing upload aborts its own)."""
        out: list[tuple[str, str]] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._dir_prefix()}
        while True:
            r = self.retry.call(lambda: self.client.list_multipart_uploads(**kw),
                                f"listing the multipart uploads under s3://{self.bucket}/{self.prefix}")
            out.extend((u["Key"], u["UploadId"]) for u in r.get("Uploads", []))
            if not r.get("IsTruncated"):
                return out
            kw["KeyMarker"], kw["UploadIdMarker"] = r.get("NextKeyMarker"), r.get("NextUploadIdMarker")

    def abort_incomplete_uploads(self) -> int:
        """Abort every unfinished multipart upload under this prefix; returns how many."""
        ups = self.incomplete_uploads()
        for key, uid in ups:
            self.retry.call(lambda: self._abort_multipart(key, uid), f"aborting the upload of s3://{self.bucket}/{key}")
        if ups:
            logger.info("aborted %d unfinished multipart upload(s) under s3://%s/%s", len(ups), self.bucket,
                        self.prefix)
        return len(ups)
