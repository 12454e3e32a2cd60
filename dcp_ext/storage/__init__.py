"""Backend registry: URL scheme (or ``backend=`` name) -> writer/reader factories.

Built-in backends register themselves below. Third parties add one with
:func:`register_backend`, or declare it in their package metadata under the entry-point
group ``dcp_ext.backends`` (the entry point must resolve to a :class:`Backend`)::

    [project.entry-points."dcp_ext.backends"]
    mystore = "my_pkg.dcp:BACKEND"

A backend that declares ``options`` (a dataclass) owns the config section of its name: the
built-ins declare ``FsOptions``, ``FsspecOptions``, ``S3Options`` and ``GCSOptions`` (defined in
their modules) and ``TensorStoreOptions`` (defined in :mod:`dcp_ext.config`, so that declaring it
imports nothing of the TensorStore package), and :mod:`dcp_ext.config` builds its sections from
this registry.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..config import Config, TensorStoreOptions, check_options, load_config
from ..errors import MissingDependencyError, UnknownBackendError
# the built-in backends' modules import their clients (botocore, google-auth, fsspec) lazily
from .fs import FsOptions, LocalStore
from .fsspec import FsspecOptions, FsspecStore
from .gcs import GCSOptions, GCSStore
from .s3 import S3Options, S3Store

if TYPE_CHECKING:
    from torch.distributed.checkpoint import StorageReader, StorageWriter

__all__ = ["Backend", "register_backend", "get_backend", "backends", "storage_writer",
           "storage_reader", "split_url", "expand_shorthands", "open_store"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dcp_ext.backends"


@dataclass(frozen=True)
class Backend:
    """A storage backend: how to build a DCP ``StorageWriter``/``StorageReader`` for a URL.

    ``make_writer(url, config)`` and ``make_reader(url, config)`` receive the URL as given
    and a validated :class:`~dcp_ext.config.Config`. ``extra`` names the pip extra that
    installs the backend's dependencies (used in error messages); ``requires`` lists the
    modules it imports. ``options`` is the backend's options dataclass (see
    :class:`~dcp_ext.config.Options`): the config gets a section named after the backend
    (``[name]`` in files, ``DCP_EXT_<NAME>_<KEY>``, ``name={...}`` keywords), which
    ``make_writer``/``make_reader`` read as ``config.<name>``.
    """

    name: str
    schemes: tuple[str, ...]
    make_writer: Callable[[str, Config], Any]
    make_reader: Callable[[str, Config], Any]
    extra: str | None = None
    requires: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""
    options: type | None = None


_REGISTRY: dict[str, Backend] = {}
_SCHEMES: dict[str, str] = {}
_ENTRY_POINTS_LOADED = False


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Register ``backend`` under its name and URL schemes (and its options as a config section).

    ``ValueError`` if the name is taken (unless ``replace``) or, for a backend with options, if
    the name cannot be a config section; ``TypeError`` if ``options`` is not a valid options class.
    """
    if backend.options is not None:
        check_options(backend.name, backend.options)
    if not replace and backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    for s in backend.schemes:
        _SCHEMES[s.lower()] = backend.name


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001
        return
    for ep in eps:
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, Backend):
                obj = obj()
            if not isinstance(obj, Backend):
                raise TypeError(f"entry point {ep.name} gave {type(obj).__name__}, not a Backend")
            register_backend(obj, replace=True)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break us
            logger.warning("ignoring dcp_ext backend entry point %r: %s", ep.name, e)


def backends() -> dict[str, Backend]:
    """All registered backends by name."""
    _load_entry_points()
    return dict(_REGISTRY)


def split_url(url: str | os.PathLike) -> tuple[str, str]:
    """``"s3://b/p"`` -> ``("s3", "b/p")``; a plain path -> ``("file", path)``."""
    url = os.fspath(url)
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme.lower(), rest
    return "file", url


def get_backend(url: str | os.PathLike, config: Config) -> Backend:
    """Pick the backend for ``url`` (or ``config.backend`` when set); clear error if none."""
    _load_entry_points()
    if config.backend:
        b = _REGISTRY.get(config.backend)
        if b is None:
            raise UnknownBackendError(
                f"unknown backend {config.backend!r}; known backends: {', '.join(sorted(_REGISTRY))}")
    else:
        scheme, _ = split_url(url)
        name = _SCHEMES.get(scheme)
        if name is None:
            name = _fsspec_fallback(scheme)
        if name is None:
            known = sorted(set(_SCHEMES))
            raise UnknownBackendError(
                f"no backend for URL scheme {scheme!r} in {os.fspath(url)!r}; known schemes: "
                f"{', '.join(known)} (and any protocol fsspec knows)")
        b = _REGISTRY[name]
    for mod in b.requires:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            hint = f"pip install 'dcp-ext[{b.extra}]'" if b.extra else f"pip install {mod}"
            raise MissingDependencyError(
                f"the {b.name!r} backend needs the Python package {mod!r}, which is not "
                f"installed: {hint}") from e
    return b


def _fsspec_fallback(scheme: str) -> str | None:
    """Any protocol fsspec knows goes to the generic fsspec backend."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # pragma: no cover - fsspec is a hard dependency
        return None
    if scheme in registry or scheme in known_implementations:
        return "fsspec"
    return None


def expand_shorthands(options: dict) -> dict:
    """``cache=DIR`` is short for ``tier={"cache": DIR}`` (a tiered checkpoint)."""
    if "cache" not in options:
        return options
    options = dict(options)
    cache = options.pop("cache")
    tier = dict(options.get("tier") or {})
    tier["cache"] = os.fspath(cache) if isinstance(cache, os.PathLike) else cache
    options["tier"] = tier
    return options


def storage_writer(url: str | os.PathLike, *, config: Any = None, _extensions: Any = None,
                   **options: Any) -> StorageWriter:
    """A DCP ``StorageWriter`` for ``url``; options as in :class:`~dcp_ext.config.Config`.

    >>> dcp.save(state, storage_writer=dcp_ext.storage_writer("/ckpt/step_100"))

    With ``cache="/dev/shm/dcp_ext"`` (or ``tier.cache`` in the config) the result is a
    :class:`~dcp_ext.tiered.TieredStorageWriter`: the save commits to that fast local
    tier, and ``url`` (any byte-store backend) is written in the background.

    ``_extensions``: stock DCP's stream transforms (as ``FileSystemWriter(_extensions=...)``,
    experimental there too), for byte-store backends; see docs/backends.md.
    """
    cfg = load_config(config, **expand_shorthands(options))
    b = get_backend(url, cfg)
    logger.debug("storage_writer(%s): backend %s", url, b.name)
    if cfg.tier.cache:  # tiered: fast local tier first, this backend as the durable tier
        if _extensions:
            from ..errors import DcpExtError

            raise DcpExtError("_extensions (stream transforms) are not supported by tiered writers (cache=...): "
                              "their fast-tier copies are read back by ranged reads")
        from ..tiered import tiered_writer

        return tiered_writer(os.fspath(url), cfg, b)
    w = b.make_writer(os.fspath(url), cfg)
    if _extensions:
        from ..errors import DcpExtError
        from .writer import ExtStorageWriter, _check_extensions

        if not isinstance(w, ExtStorageWriter):
            raise DcpExtError(f"_extensions (stream transforms) need a byte-store backend; the {b.name!r} backend "
                              f"for {os.fspath(url)!r} does not take them")
        w.extensions = _check_extensions(_extensions)
        w._check_compression()
    return w


def storage_reader(url: str | os.PathLike, *, config: Any = None, _extension_registry: Any = None,
                   **options: Any) -> StorageReader:
    """A DCP ``StorageReader`` for ``url``; options as in :class:`~dcp_ext.config.Config`.

    With ``cache=`` / ``tier.cache``: a :class:`~dcp_ext.tiered.TieredStorageReader`
    that loads the newest complete copy, preferring the fast tier.

    Byte-store backends read every stock DCP 2.13 format (docs/backends.md). ``_extension_registry``:
    a ``torch.distributed.checkpoint._extension.ExtensionRegistry`` knowing the stream transforms
    of a checkpoint saved with custom ``_extensions`` (as ``FileSystemReader(_extension_registry=)``;
    stock's ``ZStandard`` is known without it).
    """
    cfg = load_config(config, **expand_shorthands(options))
    b = get_backend(url, cfg)
    logger.debug("storage_reader(%s): backend %s", url, b.name)
    if cfg.tier.cache:
        if _extension_registry is not None:
            from ..errors import DcpExtError

            raise DcpExtError("_extension_registry is not supported by tiered readers (cache=...): tiered checkpoints "
                              "are never written with custom stream transforms")
        from ..tiered import tiered_reader

        return tiered_reader(os.fspath(url), cfg, b)
    r = b.make_reader(os.fspath(url), cfg)
    if _extension_registry is not None:
        from torch.distributed.checkpoint._extension import ExtensionRegistry

        from ..errors import DcpExtError
        from .reader import ExtStorageReader

        if not isinstance(_extension_registry, ExtensionRegistry):
            raise DcpExtError(f"_extension_registry: expected a torch.distributed.checkpoint._extension."
                              f"ExtensionRegistry, got {type(_extension_registry).__name__}")
        if not isinstance(r, ExtStorageReader):
            raise DcpExtError(f"_extension_registry (stream transforms) needs a byte-store backend; the {b.name!r} "
                              f"backend for {os.fspath(url)!r} does not take it")
        r.extension_registry = _extension_registry
    return r


def open_store(url: str | os.PathLike, *, config: Any = None, **options: Any):
    """The byte :class:`~dcp_ext.storage.base.Store` of any location ``url`` (options as for
    :func:`storage_writer`; ``cache``/``tier`` are ignored): for tools that list, read and delete
    files around checkpoints (the checkpoint manager's root, ``dcp-ext ls/gc``). Backends that
    keep their own format under a byte URL (``zarr3+s3://...``) give the store of that URL."""
    from ..errors import DcpExtError

    options = {k: v for k, v in options.items() if k not in ("cache", "tier")}
    cfg = load_config(config, **options)
    if cfg.tier.cache:
        cfg.tier.cache = None
    url = os.fspath(url)
    b = get_backend(url, cfg)
    store = getattr(b.make_writer(url, cfg), "store", None)
    if store is not None:
        return store
    scheme, rest = split_url(url)
    if "+" in scheme:  # a format over a byte store: the store of the inner URL
        inner = scheme.split("+", 1)[1]
        import dataclasses

        return open_store(rest if inner == "file" else f"{inner}://{rest}",
                          config=dataclasses.replace(cfg, backend=None))
    raise DcpExtError(f"the {b.name!r} backend for {url!r} has no byte store to list or delete files with "
                      f"(use a file, fsspec, S3 or GCS URL)")


def _register_builtins() -> None:
    def store_backend(name, schemes, store_cls, options, extra=None, requires=(), description=""):
        def make_writer(url: str, cfg: Config):
            from .writer import ExtStorageWriter

            return ExtStorageWriter(store_cls(url, cfg), cfg)

        def make_reader(url: str, cfg: Config):
            from .reader import ExtStorageReader

            return ExtStorageReader(store_cls(url, cfg), cfg)

        register_backend(Backend(name, tuple(schemes), make_writer, make_reader, extra,
                                 tuple(requires), description, options))

    store_backend("fs", ["file"], LocalStore, FsOptions,
                  description="local disk or NFS: parallel writes, ranged reads, atomic commit")
    store_backend("fsspec", ["memory"], FsspecStore, FsspecOptions,
                  description="any fsspec protocol")
    store_backend("s3", ["s3", "s3a"], S3Store, S3Options, extra="s3", requires=("botocore",),
                  description="S3 and S3-compatible stores: parallel multipart, ranged GETs, retries")
    store_backend("gcs", ["gs", "gcs"], GCSStore, GCSOptions, extra="gcs", requires=("urllib3", "google.auth"),
                  description="Google Cloud Storage: resumable (or parallel composite) uploads, ranged GETs, retries")

    def tensorstore_factory(cls: str):
        def make(url: str, cfg: Config):
            from . import tensorstore

            return getattr(tensorstore, cls)(url, cfg)

        return make

    register_backend(Backend("tensorstore", ("zarr3+file", "zarr3+s3", "zarr3+gs", "zarr3+gcs"),
                             tensorstore_factory("TensorStoreWriter"), tensorstore_factory("TensorStoreReader"),
                             extra="tensorstore", requires=("tensorstore",),
                             description="each global tensor a zarr3 array (TensorStore) on local disk, S3 or GCS",
                             options=TensorStoreOptions))


_register_builtins()
