"""Where a TensorStore checkpoint lives: a URL -> the byte :class:`~dcp_ext.storage.base.Store`
for its small files (``.metadata``, the manifest, non-tensor items: the commit protocol is
the same code as every other backend's) and the TensorStore kvstore/context specs for its
arrays, built from the *same* config keys and credential conventions as the S3/GCS backends.

URL schemes: ``zarr3+file:///abs/path`` (or a plain path), ``zarr3+s3://bucket/prefix``,
``zarr3+gs://bucket/prefix`` (``zarr3+gcs://`` too); with ``backend="tensorstore"`` the plain
``s3://`` / ``gs://`` / ``file://`` URLs work as well.

Credentials (TensorStore's drivers take no secrets in their specs, so they are handed over the
way those drivers read them):

* **S3**: ``s3.access_key_id``/``secret_access_key``/``session_token`` go into a private AWS
  credentials file (mode 0600 in a 0700 temporary directory, removed when the process exits)
  named in the ``aws_credentials`` context resource; ``s3.profile`` selects a profile;
  otherwise ``AWS_ACCESS_KEY_ID`` & co. from the environment, or AWS's default chain.
  Endpoint: ``s3.endpoint_url``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; region:
  ``s3.region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, else ``us-east-1`` with an endpoint.
* **GCS**: TensorStore's ``gcs`` driver reads its endpoint and credentials from the process
  environment only. An emulator endpoint (``gcs.endpoint_url`` or ``STORAGE_EMULATOR_HOST``)
  sets ``TENSORSTORE_GCS_HTTP_URL``; ``gcs.token="anon"`` (or no token against an emulator)
  sets ``GOOGLE_AUTH_TOKEN_FOR_TESTING``; a service-account key file sets
  ``GOOGLE_APPLICATION_CREDENTIALS``. A variable already set to another value is an error
  (one process cannot talk to two GCS endpoints through TensorStore).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from ...config import Config
from ...errors import ConfigError, UnknownBackendError
from ..base import Store

__all__ = ["SCHEMES", "Location", "resolve_location", "context_spec"]

#: URL schemes of the tensorstore backend (registered in :mod:`dcp_ext.storage`)
SCHEMES = ("zarr3+file", "zarr3+s3", "zarr3+gs", "zarr3+gcs")
_KINDS = {"zarr3+file": "file", "file": "file", "zarr3+s3": "s3", "s3": "s3", "s3a": "s3",
          "zarr3+gs": "gs", "zarr3+gcs": "gs", "gs": "gs", "gcs": "gs"}
GOOGLE_ENDPOINT = "https://storage.googleapis.com"


@dataclass
class Location:
    """A checkpoint location: its byte store and the kvstore spec of its root (``path`` ends
    in ``/``); :meth:`kvstore` gives the spec of one array under it."""

    url: str
    kind: str  # "file" | "s3" | "gs"
    store: Store
    root: dict

    def kvstore(self, relpath: str) -> dict:
        """The kvstore spec of the node ``relpath`` (an array or group directory)."""
        return dict(self.root, path=self.root["path"] + relpath.strip("/") + "/")

    def describe(self, relpath: str) -> str:
        """A URL-like name of ``relpath`` for messages."""
        return f"{self.store.url.rstrip('/')}/{relpath}"


def _split(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "file", url
    scheme, rest = url.split("://", 1)
    kind = _KINDS.get(scheme.lower())
    if kind is None:
        raise UnknownBackendError(
            f"the tensorstore backend cannot use {url!r}: expected a path or a URL starting with "
            f"{', '.join(s + '://' for s in SCHEMES)} (or file://, s3://, gs:// with backend='tensorstore')")
    return kind, rest


def _bucket(kind: str, rest: str, url: str) -> tuple[str, str]:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{url!r} names no bucket: expected zarr3+{kind}://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def resolve_location(url: str, cfg: Config) -> Location:
    """Parse ``url`` and build its byte store and root kvstore spec (no I/O)."""
    kind, rest = _split(url)
    extra = dict(cfg.tensorstore.kvstore)
    if "driver" in extra or "path" in extra or "bucket" in extra:
        raise ConfigError("tensorstore.kvstore: 'driver', 'bucket' and 'path' come from the URL; give only "
                          f"driver options there (got {sorted(extra)})")
    if kind == "file":
        from ..fs import LocalStore

        path = os.path.abspath(os.path.expanduser(rest))
        root = {"driver": "file", "path": path.rstrip("/") + "/"}
        store: Store = LocalStore(path, cfg)
    elif kind == "s3":
        from ..s3 import S3Store

        bucket, prefix = _bucket(kind, rest, url)
        store = S3Store(f"s3://{bucket}/{prefix}", cfg)
        root = {"driver": "s3", "bucket": bucket, "path": f"{prefix}/" if prefix else "", **_s3_spec(cfg)}
    else:
        from ..gcs import GCSStore

        bucket, prefix = _bucket("gs", rest, url)
        store = GCSStore(f"gs://{bucket}/{prefix}", cfg)
        _gcs_environment(cfg)
        root = {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
    root.update(extra)
    return Location(url, kind, store, root)


def _s3_spec(cfg: Config) -> dict:
    o = cfg.s3
    spec: dict[str, Any] = {}
    endpoint = o.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
        region = region or "us-east-1"
    if region:
        spec["aws_region"] = region
    return spec


_CRED_LOCK = threading.Lock()
_CRED_DIR: str | None = None
_CRED_FILES: dict[tuple, tuple[str, str]] = {}


def _remove_cred_dir() -> None:
    if _CRED_DIR:
        shutil.rmtree(_CRED_DIR, ignore_errors=True)


def _aws_credentials(cfg: Config) -> dict:
    """The ``aws_credentials`` context resource for ``cfg.s3`` (see the module docstring)."""
    global _CRED_DIR
    o = cfg.s3
    if o.access_key_id or o.secret_access_key:
        if not (o.access_key_id and o.secret_access_key):
            raise ConfigError("s3.access_key_id and s3.secret_access_key must be given together")
        key = (os.getpid(), o.access_key_id, o.secret_access_key, o.session_token)
        with _CRED_LOCK:
            if key not in _CRED_FILES:
                if _CRED_DIR is None or not os.path.isdir(_CRED_DIR):
                    _CRED_DIR = tempfile.mkdtemp(prefix="dcp_ext-aws-")  # mode 0700
                    atexit.register(_remove_cred_dir)
                n = len(_CRED_FILES)
                creds, conf = os.path.join(_CRED_DIR, f"credentials{n}"), os.path.join(_CRED_DIR, f"config{n}")
                body = (f"[dcp_ext]\naws_access_key_id = {o.access_key_id}\n"
                        f"aws_secret_access_key = {o.secret_access_key}\n")
                if o.session_token:
                    body += f"aws_session_token = {o.session_token}\n"
                for path, text in ((creds, body), (conf, "[profile dcp_ext]\n")):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                _CRED_FILES[key] = (creds, conf)
            creds, conf = _CRED_FILES[key]
        return {"type": "profile", "profile": "dcp_ext", "credentials_file": creds, "config_file": conf}
    if o.profile:
        return {"type": "profile", "profile": o.profile}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {"type": "environment"}
    return {"type": "default"}


def _set_env(name: str, value: str, why: str) -> None:
    cur = os.environ.get(name)
    if cur is not None and cur != value:
        raise ConfigError(f"{why} needs {name}={value!r}, but it is already set to {cur!r} in this process "
                          f"(TensorStore's GCS driver reads it from the environment; unset it or use the "
                          f"same endpoint/credentials)")
    os.environ[name] = value


def _gcs_environment(cfg: Config) -> None:
    """Point TensorStore's ``gcs`` driver at the configured endpoint and credentials."""
    o = cfg.gcs
    ep = o.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or GOOGLE_ENDPOINT
    if "://" not in ep:
        ep = "http://" + ep
    ep = ep.rstrip("/")
    emulator = ep != GOOGLE_ENDPOINT
    if emulator:
        _set_env("TENSORSTORE_GCS_HTTP_URL", ep, f"the GCS endpoint {ep}")
    if o.token == "anon" or (o.token is None and emulator):
        if not emulator:
            raise ConfigError("gcs.token='anon' with the tensorstore backend needs an emulator endpoint "
                              "(gcs.endpoint_url or STORAGE_EMULATOR_HOST): TensorStore's GCS driver has no "
                              "anonymous mode for Google's servers")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous")
    elif o.token not in (None, "google_default"):
        path = os.path.expanduser(o.token)
        if not os.path.isfile(path):
            raise ConfigError(f"gcs.token must be None, 'anon', 'google_default' or the path of a JSON key "
                              f"file; {o.token[:4]!r}... is none of these (and no such file exists)")
        _set_env("GOOGLE_APPLICATION_CREDENTIALS", path, "gcs.token")


def context_spec(cfg: Config, kind: str) -> dict:
    """The TensorStore context: no chunk cache (checkpoint data is read once), concurrency
    limits and retries from ``[tensorstore]`` and the S3/GCS sections, S3 credentials; on local
    files, ``fs.fsync`` decides whether written chunks are fsynced."""
    t = cfg.tensorstore
    ctx: dict[str, Any] = {"cache_pool": {"total_bytes_limit": 0}}
    if t.copy_concurrency is not None:
        ctx["data_copy_concurrency"] = {"limit": t.copy_concurrency}
    if kind == "file":
        if t.concurrency is not None:
            ctx["file_io_concurrency"] = {"limit": t.concurrency}
        ctx["file_io_sync"] = bool(cfg.fs.fsync)  # fsync each chunk file, as [fs] says for data files
        return ctx
    sec = cfg.s3 if kind == "s3" else cfg.gcs
    name = "s3" if kind == "s3" else "gcs"
    ctx[f"{name}_request_concurrency"] = {"limit": t.concurrency or sec.max_concurrency * 4}
    ctx[f"{name}_request_retries"] = {"max_retries": max(1, sec.max_retries + 1),
                                      "initial_delay": f"{sec.retry_base_delay}s",
                                      "max_delay": f"{sec.retry_max_delay}s"}
    if kind == "s3":
        ctx["aws_credentials"] = _aws_credentials(cfg)
    return ctx
