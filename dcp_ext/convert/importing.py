"""Import safetensors files, a Hugging Face model directory or a ``torch.save`` file into a DCP
checkpoint, streaming: each tensor is read when the writer asks for it (``resolve_data``), and
memory holds about one tensor (or a few small ones up to ``buffer`` bytes) at a time.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import threading
import time
import weakref
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from ..config import load_config, parse_size
from ..errors import ConvertError
from ..progress import Progress
from ..storage import open_store, storage_writer
from .dcp_source import rename_key, select_keys
from .export import ConvertReport, parse_dtype, split_output
from ..storage.safetensors_format import HEADER_PREFIX, INDEX_NAME, decode_header, header_length

__all__ = ["import_checkpoint", "SafetensorsFiles", "TorchFile"]

logger = logging.getLogger(__name__)

_SLICE = 4 * 1024 * 1024  # elements per converted slice
_SHARDING_KEY = "DCP_SHARDING_INFO"  # stock HuggingFaceStorageWriter's per-rank shards


class SafetensorsFiles:
    """Tensors of one ``.safetensors`` file or a directory of them (with or without Hugging Face's
    ``model.safetensors.index.json``), read by byte range through any dcp-ext store."""

    def __init__(self, src: str, options: dict):
        if src.endswith(".safetensors"):
            parent, name = split_output(src)
            self.store = open_store(parent, **options)
            files = [name]
        else:
            parent = src if "://" in src else os.path.abspath(os.path.expanduser(src))
            self.store = open_store(parent, **options)
            if not self.store.exists(""):
                raise ConvertError(f"{src}: no such file or directory")
            files = self._files_of_dir(src)
        self.where = parent
        self.entries: dict[str, tuple[str, Any, int]] = {}
        self.objects: dict[str, Any] = {}
        for f in files:
            size = self.store.size(f)
            prefix = bytearray(HEADER_PREFIX)
            self.store.read_into(f, 0, memoryview(prefix))
            raw = bytearray(HEADER_PREFIX + header_length(bytes(prefix), f"{parent}/{f}"))
            self.store.read_into(f, 0, memoryview(raw))
            h = decode_header(bytes(raw), f"{parent}/{f}", size)
            if _SHARDING_KEY in h.metadata:
                raise ConvertError(f"{parent}/{f} holds per-rank shards written by torch's HuggingFaceStorageWriter "
                                   f"(save_distributed=True); consolidate them first "
                                   f"(torch.distributed.checkpoint._consolidate_hf_safetensors) or import the DCP "
                                   f"checkpoint they came from")
            for name, e in h.entries.items():
                if name in self.entries:
                    raise ConvertError(f"tensor {name!r} is in both {self.entries[name][0]} and {f}")
                self.entries[name] = (f, e, h.data_start)

    def _files_of_dir(self, src: str) -> list[str]:
        if self.store.exists(INDEX_NAME):
            try:
                wm = json.loads(self.store.read_bytes(INDEX_NAME))["weight_map"]
                files = sorted(set(wm.values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{src}/{INDEX_NAME} is not a Hugging Face index ({e})") from e
            missing = [f for f in files if not self.store.exists(f)]
            if missing:
                raise ConvertError(f"{src}/{INDEX_NAME} names {missing}, which are not there")
            return files
        files = sorted(p for p in self.store.list() if "/" not in p and p.endswith(".safetensors"))
        if not files:
            raise ConvertError(f"{src} holds no .safetensors files")
        return files

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1].shape

    def read(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (same shape; any dtype: converted slice by slice) with the tensor."""
        f, e, start = self.entries[name]
        if e.nbytes == 0:
            return
        if out.dtype == e.dtype:
            self.store.read_into(f, start + e.begin, memoryview(out.view(-1).view(torch.uint8).numpy()))
            return
        scratch = torch.empty(min(_SLICE, math.prod(e.shape)), dtype=e.dtype)
        flat, isz = out.view(-1), e.dtype.itemsize
        for i in range(0, flat.numel(), _SLICE):
            n = min(_SLICE, flat.numel() - i)
            view = scratch[:n]
            self.store.read_into(f, start + e.begin + i * isz, memoryview(view.view(torch.uint8).numpy()))
            flat[i:i + n].copy_(view)

    def close(self) -> None:
        self.store.close()


class TorchFile:
    """Tensors (and plain values) of a local ``torch.save`` file, memory-mapped and loaded with
    ``weights_only=True`` (nothing but tensors and plain containers is unpickled). Nested dicts
    and lists become dotted keys, as DCP names them."""

    def __init__(self, src: str):
        if "://" in src and not src.startswith("file://"):
            raise ConvertError(f"{src}: --from torch reads local files only (torch.load memory-maps them); copy it "
                               f"here first")
        path = os.path.abspath(os.path.expanduser(src.removeprefix("file://")))
        if not os.path.isfile(path):
            raise ConvertError(f"{src}: no such file")
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{src}: not loadable with torch.load(weights_only=True): "
                               f"{str(e).splitlines()[0][:300]}") from e
        self.where = path
        self.tensors: dict[str, torch.Tensor] = {}
        self.objects: dict[str, Any] = {}
        self._flatten(obj, "")

    def _flatten(self, x: Any, prefix: str) -> None:
        if isinstance(x, torch.Tensor):
            self.tensors[prefix or "tensor"] = x
        elif isinstance(x, dict) and x and all(isinstance(k, (str, int)) for k in x):
            for k, v in x.items():
                self._flatten(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(x, (list, tuple)) and x and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in x):
            for i, v in enumerate(x):
                self._flatten(v, f"{prefix}.{i}" if prefix else str(i))
        else:
            self.objects[prefix or "value"] = x

    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.tensors[name])

    def close(self) -> None:
        self.tensors.clear()


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose memory goes back to the OS as soon as it is freed.

    The writer's threads ask for tensors one after another; glibc raises its mmap threshold after
    the first large free, so later tensors would come from per-thread heaps that keep freed memory
    (measured: 8 writer threads held ~200 MiB more than the tensors in flight). An anonymous mmap
    per large tensor is unmapped when the tensor dies."""
    n = math.prod(shape) * dtype.itemsize
    if n < (1 << 20):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8).view(dtype).view(shape)


class _Budget:
    """At most ``limit`` bytes of tensors in flight (a single larger tensor may go alone)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.in_use == 0 or self.in_use + n <= self.limit)
            self.in_use += n

    def release(self, n: int) -> None:
        with self._cv:
            self.in_use -= n
            self._cv.notify_all()


class _Held:
    def __init__(self, tensor: torch.Tensor, n: int, budget: _Budget):
        self.n, self.budget, self.released = n, budget, False
        self.ref = weakref.ref(tensor)
        weakref.finalize(tensor, self.release)

    def release(self, free: bool = False) -> None:
        t = self.ref() if free else None
        if t is not None:
            t.set_()  # the writer is done with it (see _LazyPlanner): drop its storage now
        if not self.released:
            self.released = True
            self.budget.release(self.n)


class _LazyPlanner(DefaultSavePlanner):
    """Plans with meta tensors; ``resolve_data`` reads each tensor only when the writer asks.

    With dcp-ext's byte writer, each writer thread asks for its next item only after it wrote
    the previous one, so the previous tensor's memory is freed at that point (even though the
    writer still holds a reference to the emptied tensor until its next assignment)."""

    def __init__(self, load: Callable[[str], torch.Tensor], budget: _Budget, sequential: bool, bar: Progress):
        super().__init__(flatten_state_dict=False)
        self._loadfn, self._budget, self._sequential, self._bar = load, budget, sequential, bar
        self._held: dict[int, _Held] = {}

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        tid = threading.get_ident()
        prev = self._held.pop(tid, None)
        if prev is not None and self._sequential:
            prev.release(free=True)
        n = write_item.tensor_storage_size() or 0
        self._budget.acquire(n)
        try:
            t = self._loadfn(write_item.index.fqn)
        except BaseException:
            self._budget.release(n)
            raise
        self._held[tid] = _Held(t, n, self._budget)
        self._bar.advance(n)
        return t


def import_checkpoint(source: str, checkpoint: str, *, fmt: str | None = None, dtype: Any = None,
                      keys: list[str] | None = None, strip_prefix: str | None = None, add_prefix: str | None = None,
                      buffer: int | str = "128MiB", progress: bool | None = None, **options: Any) -> ConvertReport:
    """Write the tensors of ``source`` as a DCP checkpoint at ``checkpoint`` (any backend).

    ``fmt``: ``"safetensors"`` (a file or a directory of files, any backend), ``"hf"`` (a Hugging
    Face model directory: its index, else its ``*.safetensors``, else ``pytorch_model*.bin``), or
    ``"torch"`` (a local ``torch.save`` file, loaded with ``weights_only=True``); None guesses
    from the name. ``dtype`` converts floating tensors; ``keys`` (globs) selects;
    ``strip_prefix``/``add_prefix`` rename (e.g. ``add_prefix="model."`` to load the result into
    ``{"model": model.state_dict()}``). ``options`` go to the source store and the DCP writer
    (``overwrite=True`` to replace a checkpoint). Memory: about the largest tensor plus ``buffer``.
    """
    import torch.distributed.checkpoint as dcp

    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    budget = _Budget(parse_size(buffer, "buffer"))
    load_config(**options)
    src = _open_source(source, fmt, options)
    try:
        names = select_keys(src.names() + list(src.objects), keys)
        new = {k: rename_key(k, strip_prefix, add_prefix) for k in names}
        if len(set(new.values())) != len(new):
            dup = sorted(v for v in new.values() if list(new.values()).count(v) > 1)[0]
            raise ConvertError(f"two keys become {dup!r} after renaming")
        tensors = [k for k in names if k not in src.objects]
        out_dtype = {k: dtype if dtype is not None and src.dtype(k).is_floating_point and not src.dtype(k).is_complex
                     else src.dtype(k) for k in tensors}
        by_new = {new[k]: k for k in tensors}
        state: dict[str, Any] = {new[k]: torch.empty(src.shape(k), dtype=out_dtype[k], device="meta") for k in tensors}
        state.update({new[k]: src.objects[k] for k in names if k in src.objects})
        total = sum(math.prod(src.shape(k)) * out_dtype[k].itemsize for k in tensors)

        def load(fqn: str) -> torch.Tensor:
            k = by_new[fqn]
            t = _fresh(src.shape(k), out_dtype[k])
            src.read(k, t)
            return t

        writer = storage_writer(checkpoint, **options)
        from ..storage.writer import ExtStorageWriter

        bar = Progress(f"importing {source}", total, progress, logger)
        planner = _LazyPlanner(load, budget, isinstance(writer, ExtStorageWriter), bar)
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
        bar.close()
        report = ConvertReport(source, checkpoint, files=[checkpoint], tensors=len(tensors),
                               objects=len(names) - len(tensors), bytes=total,
                               largest_tensor=max((math.prod(src.shape(k)) * out_dtype[k].itemsize for k in tensors),
                                                  default=0))
    finally:
        src.close()
    report.seconds = time.perf_counter() - t0
    logger.info("imported %s into %s: %d tensors, %.1f MiB, %.2fs", source, checkpoint, report.tensors,
                report.bytes / 2**20, report.seconds)
    return report


def _open_source(source: str, fmt: str | None, options: dict):
    source = os.fspath(source)
    if fmt is None:
        low = source.lower()
        fmt = "safetensors" if low.endswith(".safetensors") else \
            "torch" if low.endswith((".pt", ".pth", ".bin", ".ckpt")) else "hf"
    if fmt not in ("safetensors", "torch", "hf"):
        raise ConvertError(f"--from must be 'safetensors', 'torch' or 'hf', got {fmt!r}")
    if fmt == "torch":
        return TorchFile(source)
    if fmt == "hf":
        parent = source if "://" in source else os.path.abspath(os.path.expanduser(source))
        store = open_store(parent, **options)
        try:
            listing = [p for p in store.list() if "/" not in p] if store.exists("") else []
        finally:
            store.close()
        if not listing:
            raise ConvertError(f"{source}: not a Hugging Face model directory (no such directory, or empty)")
        if INDEX_NAME in listing or any(p.endswith(".safetensors") for p in listing):
            return SafetensorsFiles(source, options)
        bins = sorted(p for p in listing if p.startswith("pytorch_model") and p.endswith(".bin"))
        if len(bins) == 1 and "://" not in source:
            return TorchFile(os.path.join(parent, bins[0]))
        raise ConvertError(f"{source}: no model.safetensors(.index.json) or *.safetensors files"
                           + (" (sharded pytorch_model-*.bin files: convert them to safetensors first)" if bins else ""))
    src = SafetensorsFiles(source, options)
    return src
