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
from .errors import CheckpointKeyError, CorruptCheckpointError, DcpExtError
from .integrity import ChecksumMismatch, checksum, verify_range, verify_rest
from .progress import Progress
from .storage import get_backend
from .storage.commit import MANIFEST_NAME, METADATA_NAME, committed_parts, manifest_name, metadata_name
from .storage.compression import decode_frame, unshuffle_into
from .storage.manifest import decode_manifest

__all__ = ["VerifyReport", "verify_checkpoint", "inspect_checkpoint", "checkpoint_reader", "check_item", "damage_text",
           "item_name", "FrameDamaged"]

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


def checkpoint_reader(url: str, options: dict):
    """A reader for the checkpoint at ``url`` that never unpickles anything but DCP metadata
    (whatever ``allow_pickle`` says): the URL's backend, or TensorStore when a plain path /
    ``s3://`` / ``gs://`` URL holds a zarr3 checkpoint (its manifest says so)."""
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


def inspect_checkpoint(url: str, fqns: list[str] | None = None, **options: Any) -> dict:
    """A JSON-able summary: tensors (dtype, size, chunks, stored bytes), objects, files, bytes,
    world size, the saving layout (``saved_layout``), for a compressed checkpoint its compressed
    items' data and stored bytes; for the keys matching ``fqns`` (globs), ``details``: every
    chunk's offsets, sizes, file and bytes. Reads only metadata (the JSON manifest when there is
    one); never loads a stored object. A rank-local checkpoint (``use_collectives=False``) is
    summed over its parts, listed in ``rank_local_parts``."""
    from .planner import saved_layout

    reader = checkpoint_reader(url, options)
    if hasattr(reader, "inspect"):  # a backend with its own layout (tensorstore) describes itself
        info = reader.inspect()
        info.setdefault("saved_layout", None)
        info["details"] = {n: dict(info["tensors"].get(n) or {"object": True}, stored=[])
                           for n in _matching(url, list(info["tensors"]) + info["objects"], fqns)}
        return info
    parts = committed_parts(reader.store)
    tensors: dict[str, dict] = {}
    objects: set[str] = set()
    files: dict[str, int] = {}
    checksummed = False
    algorithms: set[str] = set()
    sdm: dict[str, Any] = {}
    by_key: dict[str, list] = {}
    layout = "unknown"
    compressed = {"items": 0, "data_bytes": 0, "stored_bytes": 0}
    for part in parts:
        md = reader.read_metadata(**({} if part is None else {"rank": part}))
        layout = saved_layout(md)
        for fqn, m in sorted(md.state_dict_metadata.items()):
            if hasattr(m, "chunks"):
                t = tensors.setdefault(fqn, {"dtype": str(m.properties.dtype).removeprefix("torch."),
                                             "size": list(m.size), "chunks": 0, "bytes": 0})
                t["chunks"] += len(m.chunks)
                sdm.setdefault(fqn, []).extend(m.chunks)
            else:
                objects.add(fqn)
        for idx, loc in reader.locations.items():
            files[loc.relative_path] = files.get(loc.relative_path, 0) + loc.length
            checksummed = checksummed or loc.checksums is not None
            if loc.checksums is not None:
                algorithms.add(loc.checksums.algorithm.name)
            if loc.compression is not None:
                compressed["items"] += 1
                compressed["data_bytes"] += loc.data_length or 0
                compressed["stored_bytes"] += loc.length
            by_key.setdefault(idx.fqn, []).append((idx, loc))
            if idx.fqn in tensors:
                tensors[idx.fqn]["bytes"] += loc.length
    details = {}
    for n in _matching(url, sorted(tensors) + sorted(objects), fqns):
        d = dict(tensors.get(n) or {"object": True, "bytes": sum(loc.length for _i, loc in by_key.get(n, []))})
        d["stored"] = [{"offsets": None if idx.offset is None else list(idx.offset),
                        "sizes": _chunk_sizes(sdm.get(n, []), idx.offset),
                        "file": loc.relative_path, "offset": loc.offset, "bytes": loc.length,
                        "checksummed": loc.checksums is not None}
                       for idx, loc in sorted(by_key.get(n, []), key=lambda il: list(il[0].offset or []))]
        details[n] = d
    out = {"url": url, "tensors": dict(sorted(tensors.items())), "objects": sorted(objects), "files": files,
           "bytes": sum(files.values()), "world_size": reader.manifest_extra.get("world_size"),
           "saved_layout": None if layout.startswith("unknown") else layout,
           "has_manifest": reader.store.exists(manifest_name(parts[-1])), "checksummed": checksummed,
           # the block checksum algorithm ("xxh3_64", "crc32c"; parts saved apart could differ)
           "checksum_algorithm": ", ".join(sorted(algorithms)) or None,
           "details": details}
    if compressed["items"]:  # compression="zstd": tensors stored as frames, and how much smaller
        out["compressed"] = compressed
    if parts != (None,):
        out["rank_local_parts"] = list(parts)
    return out


def _matching(url: str, names: list[str], fqns: list[str] | None) -> list[str]:
    """``names`` matching any glob of ``fqns`` (none: no details); a glob matching nothing is an error."""
    import fnmatch

    if not fqns:
        return []
    missing = [p for p in fqns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise CheckpointKeyError(f"{url} has no key matching {', '.join(missing)}; keys look like: "
                                 f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in fqns)]


def _chunk_sizes(chunks: list, offsets) -> list | None:
    for c in chunks:
        if offsets is not None and list(c.offsets) == list(offsets):
            return list(c.sizes)
    return None


class FrameDamaged(ValueError):
    """A frame of a compressed item does not decompress (``what``: which one)."""

    def __init__(self, what: str, cause: Exception):
        super().__init__(str(cause))
        self.what = what


def _check_frames(store, loc, relpath: str, advance) -> None:
    """Decompress every frame of a compressed item and check it: the head and tail frames against
    the record's ``rest`` checksum, each data block against its block checksum."""
    ft, c = loc.compression, loc.checksums

    def frames(first: int, last: int) -> memoryview:
        start, _ = ft.frame_span(first)
        end = sum(ft.frame_span(last))
        buf = bytearray(end - start)
        store.read_into(relpath, loc.offset + start, memoryview(buf))
        return memoryview(buf)

    def decoded(mv: memoryview, what: str) -> bytearray:
        try:
            return decode_frame(mv)
        except ValueError as e:
            raise FrameDamaged(what, e) from e

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
            advance(size)
        b = e + 1


def item_name(idx) -> str:
    """How errors name one stored item: its FQN, and its chunk's offsets for a tensor chunk."""
    return f"{idx.fqn}" + (f" chunk {list(idx.offset)}" if idx.offset is not None else "")


def damage_text(idx, err: "ChecksumMismatch | FrameDamaged") -> str:
    """What :func:`check_item` found wrong with item ``idx``, in words (without the file)."""
    name = item_name(idx)
    if isinstance(err, FrameDamaged):
        return f"compressed {err.what} of {name} is damaged: {err}"
    if err.block is None:
        return f"record header of {name} is corrupt"
    return f"{name} fails its checksum at data bytes {err.start}-{err.end}"


def check_item(store, loc, relpath: str | None = None, advance=None) -> None:
    """Read every stored byte of the item at ``loc`` (from ``relpath`` of ``store``, by default
    ``loc.relative_path``) and check it against the item's checksums (``loc.checksums``, which
    must not be None): its record headers, then its data blocks in order. Raises
    :class:`ChecksumMismatch` for the first failing part, :class:`FrameDamaged` for a compressed
    frame that does not decompress. ``advance(n)`` is told of the bytes checked. The check
    ``dcp-ext verify`` runs on each item, and the tiered restore on each received file."""
    relpath = loc.relative_path if relpath is None else relpath
    advance = advance or (lambda n: None)
    c = loc.checksums
    if loc.compression is not None:
        _check_frames(store, loc, relpath, advance)
        return
    head = bytearray(c.data_offset)
    if head:
        store.read_into(relpath, loc.offset, memoryview(head))
    tail_len = loc.length - c.data_offset - c.data_length
    tail = bytearray(tail_len)
    if tail_len:
        store.read_into(relpath, loc.offset + c.data_offset + c.data_length, memoryview(tail))
    verify_rest(c, head, tail)
    part = max(c.block_size, (_PART // c.block_size) * c.block_size)
    buf = bytearray(min(part, c.data_length))
    pos = 0
    while pos < c.data_length:
        n = min(part, c.data_length - pos)
        mv = memoryview(buf)[:n]
        store.read_into(relpath, loc.offset + c.data_offset + pos, mv)
        verify_range(c, pos, mv)
        pos += n
        advance(n)


def verify_checkpoint(url: str, progress: bool | None = None, **options: Any) -> VerifyReport:
    """Check every byte of a committed checkpoint (or of every part of a rank-local one)
    against its block checksums."""
    reader = checkpoint_reader(url, options)
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
        if loc.checksums is None:
            with lock:
                report.unchecked_items += 1
            return
        try:
            check_item(store, loc, advance=bar.advance)
            with lock:
                report.bytes_checked += loc.length
        except (ChecksumMismatch, FrameDamaged) as e:
            with lock:
                report.errors.append(f"{loc.relative_path}: {damage_text(idx, e)}")
        except CorruptCheckpointError as e:
            with lock:
                report.errors.append(str(e))

    with ThreadPoolExecutor(max(1, reader.config.io_threads), thread_name_prefix="dcp_ext-verify") as pool:
        list(pool.map(lambda it: check(*it), items))
    bar.close()
    if hasattr(store, "close_readers"):
        store.close_readers()
    return report
