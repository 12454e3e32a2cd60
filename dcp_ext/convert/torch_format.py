"""Write a ``torch.save`` file one tensor at a time (``torch.load(..., weights_only=True)`` reads it).

``torch.save`` pickles the whole object first and then writes every tensor's storage, so it needs
every tensor in memory. The file format does not: it is a zip holding ``data.pkl`` (the object,
with each storage replaced by a persistent id ``("storage", <type>, <key>, "cpu", <numel>)``),
a few small records, and then ``data/<key>`` per storage. We pickle the structure with
placeholders that carry only dtype and shape, then stream each storage through torch's own zip
writer (``torch._C.PyTorchFileWriter``, the one ``torch.save`` uses) as its tensor is read.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from typing import Any, Callable

import torch

__all__ = ["LazyTensor", "StreamingTorchWriter"]


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class LazyTensor:
    """A placeholder for a tensor whose bytes are written later (by key)."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]):
        numel = 1
        for s in shape:
            numel *= s
        self.storage = _Storage(key, dtype, numel)
        self.shape = tuple(shape)

    def __reduce_ex__(self, protocol: int):
        stride = torch.empty(self.shape, device="meta").stride()
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), stride, False, collections.OrderedDict()))


_STORAGE_TYPES = torch.storage._dtype_to_storage_type_map()


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class StreamingTorchWriter:
    """``write_structure(obj)`` once (``obj`` holding :class:`LazyTensor`\\ s), then
    ``write_tensor(key, tensor)`` for every placeholder, in order, then ``close()``.

    ``sink`` receives the file's bytes in order (a file's or a dcp-ext blob writer's ``write``).
    """

    def __init__(self, sink: Callable[[bytes], Any]):
        from torch.serialization import _get_storage_alignment

        class _Stream:
            def write(self, data) -> int:
                sink(data)
                return len(data)

        self._stream = _Stream()
        self._zip = torch._C.PyTorchFileWriter(self._stream, True, _get_storage_alignment())
        self._alignment = str(_get_storage_alignment())
        self._expected: list[str] = []

    def write_structure(self, obj: Any, keys_in_order: list[str]) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", self._alignment, len(self._alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._expected = list(reversed(keys_in_order))

    def write_tensor(self, key: str, tensor: torch.Tensor) -> None:
        want = self._expected.pop() if self._expected else None
        if key != want:
            raise RuntimeError(f"tensor {key} written out of order (expected {want})")
        t = tensor.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        self._zip.write_record(f"data/{key}", t.untyped_storage(), t.numel() * t.element_size())

    def close(self) -> None:
        if self._expected:
            raise RuntimeError(f"{len(self._expected)} tensor(s) were never written")
        self._zip.write_end_of_file()
