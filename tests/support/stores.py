"""One backend under test (S3 on SeaweedFS or moto, GCS on fake-gcs-server, or a local
directory): its URLs, dcp_ext options, a fault proxy in front of a server, and a raw (stock
fsspec) view of the bucket or directory for the tests to inspect and damage objects."""

from __future__ import annotations

import os
import uuid

from tests.support.fault_proxy import FaultProxy

__all__ = ["Env"]


class Env:
    """One backend under test: URLs, options, and a raw (stock fsspec) view of the bucket."""

    def __init__(self, kind: str, server, root: str | None = None):
        self.kind, self.server, self.root = kind, server, root
        self.scheme = {"s3": "s3", "gcs": "gs", "local": "file"}[kind]

    @classmethod
    def of(cls, request, name: str) -> "Env":
        """The backend ``name`` ("s3", "s3-moto", "gcs" or "local") from the session's server
        fixtures (``local``: the test's ``tmp_path``)."""
        if name == "local":
            return cls("local", None, str(request.getfixturevalue("tmp_path")))
        fixture = {"s3": "s3_server", "s3-moto": "moto_server", "gcs": "gcs_server"}[name]
        return cls("gcs" if name == "gcs" else "s3", request.getfixturevalue(fixture))

    def url(self, name: str = "ck") -> str:
        if self.kind == "local":
            return os.path.join(self.root, uuid.uuid4().hex[:10], name)
        return f"{self.scheme}://{self.server.bucket}/{uuid.uuid4().hex[:10]}/{name}"

    def opts(self, endpoint: str | None = None, **kw) -> dict:
        if self.kind == "local":
            return {}
        return self.server.options(endpoint=endpoint, **kw)

    def proxy(self) -> FaultProxy:
        host, port = self.server.endpoint.split("//", 1)[1].rsplit(":", 1)
        return FaultProxy(host, int(port)).start()

    @property
    def fs(self):
        import fsspec

        if self.kind == "local":
            return fsspec.filesystem("file")
        return fsspec.filesystem(self.scheme, skip_instance_cache=True, use_listings_cache=False,
                                 **self.server.fsspec_options())

    def path(self, url: str, rel: str = "") -> str:
        p = url if self.kind == "local" else url.split("://", 1)[1]
        return f"{p}/{rel}" if rel else p

    def names(self, url: str) -> list[str]:
        root = self.path(url)
        try:
            return sorted(p[len(root) + 1:] for p in self.fs.find(root))
        except FileNotFoundError:
            return []

    def get(self, url: str, rel: str) -> bytes:
        return self.fs.cat_file(self.path(url, rel))

    def put(self, url: str, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(url, rel), data)

    def rm(self, url: str, rel: str) -> None:
        self.fs.rm_file(self.path(url, rel))

    def pending_uploads(self, url: str) -> list:
        """Unfinished multipart uploads (S3) / leftover part objects (GCS) under ``url``."""
        if self.kind == "s3":
            r = self.server.client().list_multipart_uploads(Bucket=self.server.bucket, Prefix=self.path(url).split("/", 1)[1])
            return [u["Key"] for u in r.get("Uploads", [])]
        return [n for n in self.names(url) if ".dcp_ext-part." in n]
