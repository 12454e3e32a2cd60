"""Read a DCP checkpoint a few tensors at a time, through any dcp-ext reader.

The metadata is read once (our reader takes it from the JSON manifest); then each batch of
tensors runs DCP's load protocol in this process only (no process group: planner -> plan ->
``read_data``), so memory holds one batch at a time: the largest tensor, or a few small ones up
to a byte budget. Non-tensor items come back as their raw stored bytes, never unpickled here.
"""

from __future__ import annotations

import fnmatch
import io
import math
from typing import Any, Iterable, Iterator

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from ..errors import ConvertError
from ..verify import checkpoint_reader

__all__ = ["CheckpointTensors", "select_keys", "rename_key"]


def select_keys(names: Iterable[str], patterns: Iterable[str] | None) -> list[str]:
    """``names`` matching any glob of ``patterns`` (all when none), in order; a pattern that
    matches nothing is an error (a typo would otherwise silently export nothing)."""
    names = list(names)
    pats = list(patterns or [])
    if not pats:
        return names
    unused = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConvertError(f"--keys {' '.join(unused)} matched no key; keys look like: {sample}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def rename_key(name: str, strip_prefix: str | None, add_prefix: str | None) -> str:
    """Drop ``strip_prefix`` (where present), then prepend ``add_prefix``."""
    if strip_prefix and name.startswith(strip_prefix):
        name = name[len(strip_prefix):]
    return f"{add_prefix or ''}{name}"


class _BatchPlanner(DefaultLoadPlanner):
    """Loads into a flat {fqn: tensor} dict; keeps non-tensor items as raw bytes."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


class CheckpointTensors:
    """The tensors (and objects) of one DCP checkpoint, readable in bounded batches."""

    def __init__(self, url: str, **options: Any):
        self.url = url
        self.reader = checkpoint_reader(url, options)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)
        sdm = self.metadata.state_dict_metadata
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in sdm.items() if isinstance(v, TensorStorageMetadata)}
        self.objects: list[str] = [k for k, v in sdm.items() if isinstance(v, BytesStorageMetadata)]

    def nbytes(self, fqn: str) -> int:
        md = self.tensors[fqn]
        return math.prod(md.size) * torch._utils._element_size(md.properties.dtype)

    def dtype(self, fqn: str) -> torch.dtype:
        return self.tensors[fqn].properties.dtype

    def shape(self, fqn: str) -> tuple[int, ...]:
        return tuple(self.tensors[fqn].size)

    def batches(self, fqns: Iterable[str], budget: int) -> Iterator[list[str]]:
        """Consecutive groups of ``fqns`` whose bytes stay within ``budget`` (a larger tensor
        forms a group of its own)."""
        group: list[str] = []
        size = 0
        for f in fqns:
            n = self.nbytes(f)
            if group and size + n > budget:
                yield group
                group, size = [], 0
            group.append(f)
            size += n
        if group:
            yield group

    def load(self, fqns: list[str]) -> dict[str, torch.Tensor]:
        """Fresh full tensors for ``fqns`` (every chunk of each assembled)."""
        sd = {f: torch.empty(self.shape(f), dtype=self.dtype(f)) for f in fqns}
        self._run(sd)
        return sd

    def load_raw_objects(self, fqns: list[str]) -> dict[str, bytes]:
        """The stored bytes of non-tensor items (a ``torch.save`` record each), never unpickled:
        read by byte range where the reader says where items are (byte backends), else through
        the reader (which applies its own pickle policy)."""
        locations = getattr(self.reader, "locations", None)
        store = getattr(self.reader, "store", None)
        if locations is None or store is None:
            return self._run({f: None for f in fqns}).raw
        where = {idx.fqn: loc for idx, loc in locations.items() if idx.fqn in set(fqns)}
        framed = [f for f in fqns if getattr(where[f], "compression", None) is not None]
        out = self._run({f: None for f in framed}).raw if framed else {}  # compressed: the reader decodes
        for f in fqns:
            if f in out:
                continue
            loc = where[f]
            buf = bytearray(loc.length)
            store.read_into(loc.relative_path, loc.offset, memoryview(buf))
            out[f] = bytes(buf)
        return out

    def _run(self, sd: dict[str, Any]) -> _BatchPlanner:
        planner = _BatchPlanner()
        planner.set_up_planner(sd, self.metadata, True)
        plan = self.reader.prepare_local_plan(planner.create_local_plan())
        plans = self.reader.prepare_global_plan(planner.create_global_plan([plan]))
        plan = planner.finish_plan(plans[0])
        self.reader.read_data(plan, planner).wait()
        return planner

    def close(self) -> None:
        store = getattr(self.reader, "store", None)
        if store is not None:
            store.close()
