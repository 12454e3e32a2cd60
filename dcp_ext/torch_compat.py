"""The differences between the torch versions dcp-ext supports (2.7 to 2.13), in one place.

Every branch here detects a feature (``hasattr``, a dataclass field, a signature, a probe), never
a version number, and says which torch versions take it. On the torch CI installs (2.13) each
one takes its modern path; ``tests/test_torch_compat.py`` forces every old path by
monkeypatching, and ``tests/old_torch.sh`` runs the whole suite on a real old torch
(docs/architecture.md, "The torch floor").
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import io
import logging
import pickle
import threading
import types
import weakref
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["validate_global_plan", "metadata_version", "async_save_kwargs", "ASYNC_SAVE_TAKES_STAGER",
           "crc_option_is_context_local", "process_wide_zip_crc_disabled", "reports_metadata_errors",
           "stock_load_hides_reader_errors", "torch_save"]


# --------------------------------------------------------------- DCP's global-plan check (planner.py)
class _Collect(logging.Handler):
    """Keeps the messages this thread logs (older torch reports plan problems only as warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(" ".join(record.getMessage().split()))


def validate_global_plan(global_plan: list[Any], metadata: Metadata) -> list[str]:
    """Stock DCP's check that the saved chunks tile every tensor: the problems found (empty: valid).

    torch 2.13 returns that list. Older torch (2.7 and 2.9 here) returns a bool and logs each
    problem as a warning, so the warnings stock logs on this thread during the call are
    collected instead.
    """
    log = logging.getLogger(default_planner.__name__)
    collect = _Collect()
    log.addHandler(collect)
    try:
        result = default_planner._validate_global_plan(global_plan, metadata)
    finally:
        log.removeHandler(collect)
    if not isinstance(result, bool):
        return list(result)
    if result:  # a bool: older torch from here
        return []
    return collect.messages or [f"stock DCP's _validate_global_plan rejected the plan (its warnings on the "
                                f"{default_planner.__name__!r} logger say why)"]


# --------------------------------------------------------------- Metadata.version (manifest.py)
#: ``Metadata.version`` (the DCP format version) exists in torch 2.9 and 2.13; torch 2.7 has no such field
METADATA_HAS_VERSION = any(f.name == "version" for f in dataclasses.fields(Metadata))


def metadata_version(version: str | None) -> dict[str, Any]:
    """``Metadata``'s ``version=`` argument, or nothing where it has no such field (torch 2.7)."""
    return {"version": version} if METADATA_HAS_VERSION else {}


# --------------------------------------------------------------- dcp.async_save's arguments (staging.py)
def _async_save_params() -> frozenset[str]:
    import torch.distributed.checkpoint as dcp

    try:
        return frozenset(inspect.signature(dcp.async_save).parameters)
    except (TypeError, ValueError):  # pragma: no cover - wrapped beyond inspection: assume the newest
        return frozenset({"async_stager", "no_dist", "use_collectives"})


_ASYNC_SAVE_PARAMS = _async_save_params()

#: torch 2.9 and 2.13: ``dcp.async_save(async_stager=...)``. torch 2.7 takes no stager argument: it
#: stages through the storage writer when that is an ``AsyncStager`` (see :class:`_StagingWriter`).
ASYNC_SAVE_TAKES_STAGER = "async_stager" in _ASYNC_SAVE_PARAMS


class _StagingWriter:
    """A storage writer that stages with ``stager`` (torch 2.7 path of :func:`async_save_kwargs`).

    torch 2.7's ``dcp.async_save`` calls ``stage()`` on the storage writer when that is an
    ``AsyncStager`` (a runtime-checked protocol: the members defined here). Everything else is
    delegated to the real writer. Pickling (the process executor) keeps only the real writer.
    """

    _synchronize_after_execute = False

    def __init__(self, writer: Any, stager: Any) -> None:
        self._writer = writer
        self._stager = stager

    @property
    def should_synchronize_after_execute(self) -> bool:
        return bool(self._stager.should_synchronize_after_execute)

    def stage(self, state_dict: dict[str, Any]) -> Any:
        return self._stager.stage(state_dict)

    def synchronize_staging(self) -> None:
        self._stager.synchronize_staging()

    def close(self) -> None:
        """No-op: the caller owns (and closes) the stager (part of newer torch's ``AsyncStager``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_writer", "_stager"):
            raise AttributeError(name)
        return getattr(self._writer, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"_writer": self._writer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._writer = state["_writer"]
        self._stager = None


def async_save_kwargs(kwargs: dict[str, Any], async_stager: Any = None) -> dict[str, Any]:
    """The arguments for this torch's ``dcp.async_save``, given those torch 2.13 takes.

    torch 2.7's ``async_save`` has no ``async_stager``: the stager is applied by wrapping
    ``storage_writer`` (or the writer stock picks for ``checkpoint_id``). It has no ``no_dist`` and no
    ``use_collectives`` either; it saves in a single process by itself when no process group is
    initialised, so ``no_dist=True`` is dropped then. What it cannot do (``no_dist`` beside an
    initialised group, a rank-local save) is refused with a clear error.
    """
    kwargs = dict(kwargs)
    if "no_dist" not in _ASYNC_SAVE_PARAMS and kwargs.pop("no_dist", False):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise TypeError(f"async_save(no_dist=True) with a process group initialised needs torch >= 2.9 "
                            f"(this is torch {torch.__version__}, whose dcp.async_save has no no_dist)")
    if "use_collectives" not in _ASYNC_SAVE_PARAMS and not kwargs.pop("use_collectives", True):
        raise TypeError(f"async_save(use_collectives=False) needs torch >= 2.9 (this is torch "
                        f"{torch.__version__}, whose dcp.async_save has no use_collectives)")
    if async_stager is None:
        return kwargs
    if ASYNC_SAVE_TAKES_STAGER:
        return {**kwargs, "async_stager": async_stager}
    writer = kwargs.get("storage_writer")  # torch 2.7 from here
    if writer is None:  # the writer stock would pick for checkpoint_id
        from torch.distributed.checkpoint._storage_utils import _storage_setup

        writer = _storage_setup(None, kwargs.get("checkpoint_id"), reader=False)
    kwargs["storage_writer"] = _StagingWriter(writer, async_stager)
    return kwargs


# --------------------------------------------------------------- torch.save's zip CRC32 switch (records.py)
_crc_local: bool | None = None
_crc_lock = threading.Lock()
_crc_users = 0
_crc_saved = True


def crc_option_is_context_local() -> bool:
    """Whether torch keeps ``set_crc32_options`` per :mod:`contextvars` context (thread).

    torch 2.13 does; older torch (2.7, 2.9) keeps one process-wide setting. Probed once, by setting
    it in a copy of the current context and checking that this context did not see it.
    """
    global _crc_local
    if _crc_local is None:
        get, put = torch.serialization.get_crc32_options, torch.serialization.set_crc32_options
        cur = get()
        contextvars.copy_context().run(put, not cur)
        _crc_local = get() == cur
        if not _crc_local:
            put(cur)
    return _crc_local


@contextlib.contextmanager
def process_wide_zip_crc_disabled() -> Iterator[None]:
    """Turn the process-wide zip CRC32 of older torch (2.7, 2.9) off while any thread is inside.

    A reference count shared by all threads switches it off on the first entry and restores the
    saved setting when the last one leaves, so overlapping saves never turn it back on under
    each other. Other ``torch.save`` calls in the process skip the CRC meanwhile (torch offers
    nothing narrower there).
    """
    global _crc_users, _crc_saved
    with _crc_lock:
        if _crc_users == 0:
            _crc_saved = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                torch.serialization.set_crc32_options(_crc_saved)


# --------------------------------------------------------------- read_metadata errors in dcp.load (readers)
_hides: bool | None = None


def stock_load_hides_reader_errors() -> bool:
    """Whether stock ``dcp.load`` drops what ``read_metadata`` raises.

    torch 2.9 catches it (and the rank-local retry's), logs "Global metadata is not found" at
    INFO without the reason, then fails on ``assert metadata is not None``: the user never learns
    why. torch 2.7 has no retry and lets the error propagate; torch 2.13 names both errors in its
    own ("global metadata read failed: ..."). Read once from the loader's source: a retry whose
    error message does not carry the reader's.
    """
    global _hides
    if _hides is None:
        from torch.distributed.checkpoint import state_dict_loader

        try:
            src = inspect.getsource(state_dict_loader)
        except (OSError, TypeError):  # pragma: no cover - no source shipped: assume it reports
            src = ""
        _hides = "read_metadata(rank=" in src and "metadata read failed" not in src
    return _hides


_F = TypeVar("_F", bound=Callable[..., Any])


def reports_metadata_errors(read_metadata: _F) -> _F:
    """Make a reader's ``read_metadata`` errors seen where stock ``dcp.load`` hides them (torch 2.9).

    Stock's loader first calls ``read_metadata()``, then, if that raised, ``read_metadata(rank=r)``
    (a rank-local checkpoint). When that retry fails too and this torch hides both errors
    (:func:`stock_load_hides_reader_errors`), both are logged at ERROR on the reader's module
    logger before stock's bare ``AssertionError``. A successful retry (a rank-local checkpoint
    really) logs nothing; elsewhere the errors propagate as usual.
    """
    @functools.wraps(read_metadata)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return read_metadata(self, *args, **kwargs)
        except Exception as e:
            if not stock_load_hides_reader_errors():
                raise
            if kwargs.get("rank") is None:
                self._compat_metadata_error = e
            else:
                log = logging.getLogger(type(self).__module__)
                first = getattr(self, "_compat_metadata_error", None)
                if first is not None and first is not e:
                    log.error("%s: %s", type(first).__name__, first)
                log.error("%s: %s", type(e).__name__, e)
                self._compat_metadata_error = None
            raise
    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------- torch.save's storage cycle (records)
_leaks: bool | None = None


def torch_save_keeps_storages() -> bool:
    """Whether ``torch.save`` leaves the storages it wrote in a reference cycle.

    torch 2.7 and 2.9 do: the pickler class ``torch.save`` defines per call and its
    ``persistent_id`` closure refer to each other, and the closure holds every storage written,
    until the cyclic GC runs (2.13 breaks the cycle). Probed once: the storage's reference count
    after a save with the GC off.
    """
    global _leaks
    if _leaks is None:
        t = torch.zeros(4)
        count = torch._C._storage_Use_Count  # type: ignore[attr-defined]
        before = count(t.untyped_storage()._cdata)
        was = gc.isenabled()
        gc.disable()
        try:
            torch.save(t, io.BytesIO())
            _leaks = count(t.untyped_storage()._cdata) > before
        finally:
            if was:
                gc.enable()
    return _leaks


class _Pickler(pickle.Pickler):
    """``pickle.Pickler`` that notes, per thread, the subclass ``torch.save`` defines in a call."""

    made = threading.local()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _Pickler.made.cls = cls


#: what ``torch.save(pickle_module=)`` uses of a pickle module: ``Pickler`` (and ``__name__``)
_PICKLE = types.SimpleNamespace(__name__="pickle", Pickler=_Pickler)


def torch_save(obj: Any, f: Any) -> None:
    """``torch.save(obj, f)`` that does not keep a tensor's storage alive afterwards.

    Where ``torch.save`` leaves its storages in a cycle (:func:`torch_save_keeps_storages`:
    torch 2.7, 2.9), the cyclic GC frees them only once enough Python objects were allocated,
    which a save of a few large tensors rarely does: a streamed import held the whole checkpoint
    instead of about one tensor. There the pickler class of the call loses its
    ``persistent_id`` method, which cuts the chain to the storages (the same bytes are written:
    ``pickle.Pickler`` with a hook that only notes the class).
    """
    if not (isinstance(obj, torch.Tensor) and torch_save_keeps_storages()):
        torch.save(obj, f)
        return
    torch.save(obj, f, pickle_module=_PICKLE)
    cls = _Pickler.made.__dict__.pop("cls", None)
    if cls is not None and "persistent_id" in cls.__dict__:
        del cls.persistent_id


# --------------------------------------------------------------- freeing process groups (manager.py)
#: backends of destroyed groups whose ProcessGroup was still referenced elsewhere when we let go
_PARKED: list[tuple[Any, "weakref.ref[Any]"]] = []
_PARKED_LOCK = threading.Lock()


def _backend_of(group: Any) -> Any:
    """The Python object of ``group``'s CPU backend (its ``ProcessGroupGloo``), or None."""
    try:
        return group._get_backend(torch.device("cpu"))
    except Exception:  # noqa: BLE001 - no CPU backend, or a ProcessGroup without _get_backend
        return None


def _free_parked(extra: list[tuple[Any, "weakref.ref[Any]"]]) -> None:
    """Park ``extra`` (emptied) and free every parked backend whose ProcessGroup is gone."""
    with _PARKED_LOCK:
        _PARKED.extend(extra)
        extra.clear()
        free = [b for b, ref in _PARKED if ref() is None]
        _PARKED[:] = [(b, ref) for b, ref in _PARKED if ref() is not None]
    free.clear()  # the last references: each ~ProcessGroupGloo runs here, without the GIL


def destroy_process_groups(groups: list[Any]) -> None:
    """Destroy the process groups in ``groups`` and free them without a deadlock; empties the
    list: the caller hands over its references and must keep no other.

    torch < 2.8 frees a ``ProcessGroup`` with the GIL held (pytorch/pytorch#154976 releases it in
    2.8). ``~ProcessGroupGloo`` then locks the group's work mutex and joins its worker threads,
    while a worker that has just finished a collective destroys that work under the same mutex;
    if the caller has already let go of the work's tensors, their Python objects are freed there
    and need the GIL: rank 0 of a manager hung for good when its groups were freed a moment after
    their last collective (torch 2.7, about one run in two). So every group is freed through its
    backend's own Python object, the last reference to it, whose binding releases the GIL: the
    workers finish, then the destructor returns. A group that something else still references
    (DCP's upload thread holds its group for a moment after the upload future resolved) keeps
    its backend parked here until it is gone, checked at the next call and at exit.
    """
    import torch.distributed as dist

    held: list[tuple[Any, weakref.ref[Any]]] = []
    while groups:
        group = groups.pop(0)
        backend = _backend_of(group)
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - the default group may already be gone
            pass
        if backend is not None:
            held.append((backend, weakref.ref(group)))
        del group, backend  # the backend's last reference is now in ``held``
    _free_parked(held)


atexit.register(_free_parked, [])
