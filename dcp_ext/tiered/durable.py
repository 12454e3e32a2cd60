"""The durable tier: the byte store (and reader) of a tiered checkpoint's durable URL, built
through the backend registry like any other dcp-ext location."""

from __future__ import annotations

import os
from typing import Any

from ..config import Config
from ..errors import DcpExtError
from ..storage import Backend, get_backend
from ..storage.base import Store
from ..storage.reader import ExtStorageReader
from ..storage.writer import ExtStorageWriter

__all__ = ["durable_store", "durable_reader"]


def _built(url: str, cfg: Config, b: Backend | None, reader: bool) -> Any:
    """The backend's writer (or reader) for ``url``, which must be a byte-store one."""
    b = b or get_backend(url, cfg)
    obj = (b.make_reader if reader else b.make_writer)(url, cfg)
    if not isinstance(obj, ExtStorageReader if reader else ExtStorageWriter):
        raise DcpExtError(f"tiered checkpoints need a byte-store backend for the durable tier; the {b.name!r} "
                          f"backend for {url!r} is not one (use a file, fsspec, S3 or GCS URL)")
    return obj


def durable_store(url: str | os.PathLike, cfg: Config, b: Backend | None = None) -> Store:
    """The :class:`~dcp_ext.storage.base.Store` of the durable tier for ``url`` (no I/O)."""
    return _built(os.fspath(url), cfg, b, reader=False).store


def durable_reader(url: str | os.PathLike, cfg: Config, b: Backend | None = None) -> ExtStorageReader:
    """A reader of the durable copy alone."""
    return _built(os.fspath(url), cfg, b, reader=True)
