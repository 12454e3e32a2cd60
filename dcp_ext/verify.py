"""Offline inspection and verification of a checkpoint (``dcp-ext inspect`` / ``verify``).

``verify_checkpoint`` re-reads every stored byte once, in parallel, and checks it against
the manifest's block checksums (with :func:`dcp_ext.integrity.verify_range`, the check the
reader uses), without building any tensor (so it needs little memory whatever the checkpoint
size). It reports every damaged item, not just the first. Neither function unpickles anything
when the checkpoint has our manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .config import load_config
from .errors import CorruptCheckpointError, DcpExtError
from .integrity import ChecksumMismatch, checksum, verify_range, verify_rest
from .progress import Progress
from .storage import get_backend
from .storage.commit import MANIFEST_NAME, METADATA_NAME, committed_parts, manifest_name, metadata_name
from .storage.compression import decode_frame, unshuffle_into
from .storage.manifest import decode_manifest

__all__ = ["VerifyReport", "verify_checkpoint", "inspect_checkpoint"]

logger = logging.getLogger(__name__)

_PART = 16 * 1024 * 1024


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_checkpoint`."""

    url: str
    items: int = 0
    bytes_checked: int = 0
    unchecked_items: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _reader(url: str, options: dict):
    # never unpickle anything but DCP metadata here, whatever allow_pickle says elsewhere
    cfg = dataclasses.replace(load_config(**options), allow_pickle=False)
    reader = get_backend(url, cfg).make_reader(url, cfg)
    if not cfg.backend and not hasattr(reader, "verify") and _layout(reader.store) == "zarr3":
        # a TensorStore checkpoint reached by a plain path / s3:// / gs:// URL
        cfg = dataclasses.replace(load_config(**{**options, "backend": "tensorstore"}), allow_pickle=False)
        reader = get_backend(url, cfg).make_reader(url, cfg)
    if not hasattr(reader, "verify") and not hasattr(reader, "locations"):
        raise DcpExtError(f"{url}: this backend's reader can neither verify itself nor give byte locations")
    return reader


def _layout(store) -> str | None:
    """The ``layout`` a committed location's manifest names (None: DCP data files)."""
    try:
        if not store.exists(METADATA_NAME) or not store.exists(MANIFEST_NAME):
            return None
        return decode_manifest(store.read_bytes(MANIFEST_NAME), store.url).extra.get("layout")
    except (OSError, DcpExtError):
        return None  # the normal path reports it


def inspect_checkpoint(url: str, **options: Any) -> dict:
    """A JSON-able summary: tensors (dtype, size, chunks), objects, files, bytes, world size (and,
    for a compressed checkpoint, its compressed items' data and stored bytes).

    A rank-local checkpoint (``use_collectives=False``) is summed over its parts, listed in
    ``rank_local_parts``."""
    reader = _reader(url, options)
    if hasattr(reader, "inspect"):  # a backend with its own layout (tensorstore) describes itself
        return reader.inspect()
    parts = committed_parts(reader.store)
    tensors: dict[str, dict] = {}
    objects: set[str] = set()
    files: dict[str, int] = {}
    checksummed = False
    compressed = {"items": 0, "data_bytes": 0, "stored_bytes": 0}
    for part in parts:
        md = reader.read_metadata(**({} if part is None else {"rank": part}))
        for fqn, m in sorted(md.state_dict_metadata.items()):
            if hasattr(m, "chunks"):
                t = tensors.setdefault(fqn, {"dtype": str(m.properties.dtype).removeprefix("torch."),
                                             "size": list(m.size), "chunks": 0})
                t["chunks"] += len(m.chunks)
            else:
                objects.add(fqn)
        for loc in reader.locations.values():
            files[loc.relative_path] = files.get(loc.relative_path, 0) + loc.length
            checksummed = checksummed or loc.checksums is not None
            if loc.compression is not None:
                compressed["items"] += 1
                compressed["data_bytes"] += loc.data_length or 0
                compressed["stored_bytes"] += loc.length
    out = {"url": url, "tensors": dict(sorted(tensors.items())), "objects": sorted(objects), "files": files,
           "bytes": sum(files.values()), "world_size": reader.manifest_extra.get("world_size"),
           "has_manifest": reader.store.exists(manifest_name(parts[-1])), "checksummed": checksummed}
    if compressed["items"]:  # compression="zstd": tensors stored as frames, and how much smaller
        out["compressed"] = compressed
    if parts != (None,):
        out["rank_local_parts"] = list(parts)
    return out


class _FrameDamaged(ValueError):
    """A frame of a compressed item does not decompress (``what``: which one)."""

    def __init__(self, what: str, cause: Exception):
        super().__init__(str(cause))
        self.what = what


def _check_frames(store, loc, bar: Progress) -> None:
    """Decompress every frame of a compressed item and check it: the head and tail frames against
    the record's ``rest`` checksum, each data block against its block checksum."""
    ft, c = loc.compression, loc.checksums

    def frames(first: int, last: int) -> memoryview:
        start, _ = ft.frame_span(first)
        end = sum(ft.frame_span(last))
        buf = bytearray(end - start)
        store.read_into(loc.relative_path, loc.offset + start, memoryview(buf))
        return memoryview(buf)

    def decoded(mv: memoryview, what: str) -> bytearray:
        try:
            return decode_frame(mv)
        except ValueError as e:
            raise _FrameDamaged(what, e) from e

    n = ft.nblocks
    head = decoded(frames(0, 0), "record header")
    tail = decoded(frames(n + 1, n + 1), "record tail")
    verify_rest(c, head, tail)
    b = 0
    while b < n:  # runs of consecutive frames of about _PART stored bytes
        e = b
        while e + 1 < n and ft.block_frame(e + 1)[0] + ft.block_frame(e + 1)[1] - ft.block_frame(b)[0] <= _PART:
            e += 1
        run = frames(b + 1, e + 1)
        base = ft.block_frame(b)[0]
        for k in range(b, e + 1):
            start, size = ft.block_frame(k)
            data = decoded(run[start - base:start - base + size], f"data block {k}")
            if ft.shuffle:
                plain = bytearray(len(data))
                unshuffle_into(data, memoryview(plain), ft.shuffle)
                data = plain
            verify_range(c, k * ft.block_size, data)
            bar.advance(size)
        b = e + 1


def verify_checkpoint(url: str, progress: bool | None = None, **options: Any) -> VerifyReport:
    """Check every byte of a committed checkpoint (or of every part of a rank-local one)
    against its block checksums."""
    reader = _reader(url, options)
    store = reader.store
    report = VerifyReport(url)
    if hasattr(reader, "verify"):  # a backend with its own layout (tensorstore) checks itself
        return reader.verify(report, progress)
    items = []
    for part in committed_parts(store):
        man, md_name = manifest_name(part), metadata_name(part)
        if not store.exists(man):
            report.errors.append(f"{url} has no {man}: it was not written by dcp-ext, nothing to verify")
            continue
        m = decode_manifest(store.read_bytes(man), f"{url}/{man}")
        if checksum(store.read_bytes(md_name)) != m.metadata_crc:
            report.errors.append(f"{url}: {md_name} does not match {man}")
        items += list(m.locations.items())
    report.items = len(items)
    total = sum(loc.length for _, loc in items if loc.checksums is not None)
    bar = Progress(f"verifying {url}", total, progress, logger)
    lock = threading.Lock()

    def check(idx, loc) -> None:
        c = loc.checksums
        name = f"{idx.fqn}" + (f" chunk {list(idx.offset)}" if idx.offset is not None else "")
        if c is None:
            with lock:
                report.unchecked_items += 1
            return
        try:
            if loc.compression is not None:
                _check_frames(store, loc, bar)
                with lock:
                    report.bytes_checked += loc.length
                return
            head = bytearray(c.data_offset)
            if head:
                store.read_into(loc.relative_path, loc.offset, memoryview(head))
            tail_len = loc.length - c.data_offset - c.data_length
            tail = bytearray(tail_len)
            if tail_len:
                store.read_into(loc.relative_path, loc.offset + c.data_offset + c.data_length, memoryview(tail))
            verify_rest(c, head, tail)
            part = max(c.block_size, (_PART // c.block_size) * c.block_size)
            buf = bytearray(min(part, c.data_length))
            pos = 0
            while pos < c.data_length:
                n = min(part, c.data_length - pos)
                mv = memoryview(buf)[:n]
                store.read_into(loc.relative_path, loc.offset + c.data_offset + pos, mv)
                verify_range(c, pos, mv)
                pos += n
                bar.advance(n)
            with lock:
                report.bytes_checked += loc.length
        except ChecksumMismatch as e:
            msg = (f"{loc.relative_path}: record header of {name} is corrupt" if e.block is None else
                   f"{loc.relative_path}: {name} fails its checksum at data bytes {e.start}-{e.end}")
            with lock:
                report.errors.append(msg)
        except CorruptCheckpointError as e:
            with lock:
                report.errors.append(str(e))
        except _FrameDamaged as e:
            with lock:
                report.errors.append(f"{loc.relative_path}: compressed {e.what} of {name} is damaged: {e}")

    with ThreadPoolExecutor(max(1, reader.config.io_threads), thread_name_prefix="dcp_ext-verify") as pool:
        list(pool.map(lambda it: check(*it), items))
    bar.close()
    if hasattr(store, "close_readers"):
        store.close_readers()
    return report
