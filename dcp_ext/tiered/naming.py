"""Where a checkpoint's fast-tier copy lives: one directory per durable URL under the cache root.

The directory is named ``<last two URL parts>-<sha1 of the canonical URL>[:12]``, so every node
(and every later process) finds the same name for the same durable URL without asking anyone.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid

from ..errors import StorageError

__all__ = ["canonical_url", "fast_dir_name", "fast_dir_for", "cache_root", "check_cache_root",
           "is_fast_dir_name"]

_FAST_DIR_RE = re.compile(r"-[0-9a-f]{12}$")


def canonical_url(url: str | os.PathLike) -> str:
    """One spelling per location: local paths become absolute ``file://`` URLs, and a trailing
    ``/`` is dropped, so ``/ckpt/a``, ``file:///ckpt/a`` and ``/ckpt/a/`` are the same checkpoint."""
    url = os.fspath(url)
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


def fast_dir_name(url: str | os.PathLike) -> str:
    """Stable directory name in the cache root for a durable URL: ``<last parts>-<sha1[:12]>``."""
    canon = canonical_url(url)
    tail = "_".join([p for p in canon.split("://", 1)[-1].split("/") if p][-2:]) or "root"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:80]
    return f"{tail}-{hashlib.sha1(canon.encode()).hexdigest()[:12]}"


def is_fast_dir_name(name: str) -> bool:
    """Whether a cache-root entry is named like a checkpoint's fast-tier directory."""
    return bool(_FAST_DIR_RE.search(name))


def cache_root(cache: str | os.PathLike) -> str:
    """The absolute cache root for the ``tier.cache`` option."""
    return os.path.abspath(os.path.expanduser(os.fspath(cache)))


def fast_dir_for(url: str | os.PathLike, cache: str | os.PathLike) -> str:
    """The fast-tier directory of durable ``url`` under the cache root ``cache``."""
    return os.path.join(cache_root(cache), fast_dir_name(url))


def check_cache_root(root: str) -> None:
    """Create the cache root and prove it is writable (``os.access`` lies for root)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise StorageError(f"tier.cache {root!r} is not usable: it exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".dcp_ext_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise StorageError(f"tier.cache {root!r} is not usable: cannot create files there "
                           f"({e.strerror or e}); point tier.cache at a writable directory "
                           f"(e.g. /dev/shm/dcp_ext or a local NVMe path)") from e
