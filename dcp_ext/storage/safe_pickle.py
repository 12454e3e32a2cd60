"""What our reader unpickles, and what it refuses: pickle-free by default.

Unpickling calls whatever functions the pickle names, so loading an untrusted checkpoint with
plain ``pickle``/``torch.load(weights_only=False)`` can run code. A DCP checkpoint holds pickles
in two places, and our reader takes both out of that path unless ``allow_pickle=True``:

* **Stock ``.metadata``** (our checkpoints carry a JSON manifest and need no unpickling): read
  by :class:`MetadataUnpickler`, which resolves only DCP's metadata classes and the few standard
  types they hold (:data:`METADATA_GLOBALS`: ``torch.Size``, dtypes, layouts, ``pathlib`` paths,
  ``OrderedDict``, ``set``); anything else is refused, naming the global.
* **Non-tensor values** (DCP's ``BYTE_IO`` items: ``torch.save`` pickles of any Python object).
  Stock ``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)`` on them
  itself, so the check happens before the bytes reach the planner: :func:`checked_bytes_item`
  loads them with ``weights_only=True`` plus :func:`safe_globals` (the types DCP and common
  trainers store), then hands the planner a fresh ``torch.save`` of the value it got, never the
  original bytes. A value that needs anything else raises :class:`~dcp_ext.errors.UnsafePickleError`
  naming the key and the one option that allows it for trusted checkpoints.

Tensors are read as raw bytes (ranged reads) or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import CorruptCheckpointError, UnsafePickleError

__all__ = ["METADATA_GLOBALS", "safe_globals", "MetadataUnpickler", "load_metadata", "checked_bytes_item"]

_HINT = ("if you trust this checkpoint, pass allow_pickle=True (or set DCP_EXT_ALLOW_PICKLE=1, or "
         "allow_pickle = true in the config file)")

#: what a DCP ``.metadata`` pickle may name, besides torch dtypes/layouts/memory formats
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *((m, n) for m in ("pathlib", "pathlib._local")
      for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
})


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` and nothing else: every global the pickle names must be one of
    :data:`METADATA_GLOBALS` or a torch dtype, layout or memory format."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def load_metadata(raw: bytes, where: str, allow_pickle: bool) -> Metadata:
    """Unpickle a ``.metadata`` file (``where`` names it in errors): restricted unless
    ``allow_pickle``; :class:`CorruptCheckpointError` if it does not hold DCP ``Metadata``."""
    try:
        md = pickle.loads(raw) if allow_pickle else MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        if allow_pickle or "is not part of DCP metadata" not in str(e):
            raise CorruptCheckpointError(f"{where} is unreadable: {e}") from e
        raise UnsafePickleError(
            f"{where} names {str(e).removesuffix(' is not part of DCP metadata')}, which is not part of DCP "
            f"metadata: refusing to unpickle it (unpickling an untrusted checkpoint can run code); "
            f"{_HINT}") from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, an exception from a constructor
        raise CorruptCheckpointError(f"{where} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"{where} does not hold DCP Metadata")
    return md


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return []
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    dtypes = getattr(np, "dtypes", None)
    classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes is not None else []
    return [ma._reconstruct, ma.scalar, np.ndarray, np.dtype, *classes]


def safe_globals() -> list[Any]:
    """What non-tensor values may contain beyond ``torch.load(weights_only=True)``'s defaults
    (which already admit tensors, ``torch.Size``, dtypes, ``dict``/``list``/``tuple``/``set``,
    ``OrderedDict``, ``Counter``, ``bytes``, ``complex``): values DCP accepts (``io.BytesIO``) and
    what trainers commonly save (``pathlib`` paths, ``datetime`` values, ``argparse.Namespace``,
    ``frozenset``/``slice``/``range``, NumPy arrays, scalars and RNG states). ``defaultdict`` and
    ``deque`` are not among them: weights-only loading cannot rebuild them."""
    import argparse
    import datetime

    return [io.BytesIO, pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath,
            pathlib.PurePosixPath, pathlib.PureWindowsPath, datetime.datetime, datetime.date, datetime.time,
            datetime.timedelta, datetime.timezone, argparse.Namespace, frozenset, slice, range,
            *_numpy_globals()]


def _reason(e: BaseException) -> str:
    """The useful line of torch's weights-only error (e.g. ``Unsupported global: GLOBAL os.system``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("WeightsUnpickler error:"):
            rest = ln.removeprefix("WeightsUnpickler error:").strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(". Please", 1)[0].rstrip(".")
    return f"{type(e).__name__}: {lines[0] if lines else e}"


def checked_bytes_item(raw: bytes | bytearray | memoryview, key: str, where: str) -> bytes:
    """A non-tensor value's bytes, made safe for any planner's ``torch.load``: loaded with
    ``weights_only=True`` (plus :func:`safe_globals`) and saved again. ``key``: the value's FQN,
    ``where``: the checkpoint, both named in the :class:`UnsafePickleError` raised otherwise."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, or bytes that are no torch.save pickle
        raise UnsafePickleError(
            f"{where}: the value of {key!r} cannot be loaded without full unpickling ({_reason(e)}); refusing "
            f"to unpickle it (unpickling an untrusted checkpoint can run code); {_HINT}") from None
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()
