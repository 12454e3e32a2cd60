"""The on-disk layout of a TensorStore (zarr3) checkpoint, as pure functions (no I/O, no
``tensorstore`` import), so every rule is testable in one process.

* **Names.** Each global tensor is one zarr3 array at ``<root>/<name>``, where ``name`` is
  the FQN with every byte outside ``[A-Za-z0-9._-]`` percent-escaped (``/`` -> ``%2F``,
  ``%`` -> ``%25``), a leading ``.`` or ``__`` escaped too (``.metadata`` and zarr's reserved
  ``__`` names stay ours), and FQNs longer than :data:`MAX_NAME` bytes shortened to a prefix
  plus ``~`` and a hash. Non-tensor items live as plain files in ``__objects/<name>``.
* **Chunk grid.** Chosen from every rank's boxes (:func:`plan_array`) so that each zarr
  chunk lies inside one box: two ranks never write the same chunk (a zarr chunk is one
  file/object; two writers of one chunk would each read-modify-write it and lose data).
  Every box boundary is a multiple of the chunk extent, then chunks are split further
  (largest extent first) down to the target chunk size. When the save planner says which dims
  a later load may cut (``split``: a :class:`~dcp_ext.ReshardSavePlanner` layout's ``ShardSpec``
  dims, fused segments included), those dims are cut into :data:`SPLIT_PARTS` parts first (a load
  at 2, 4 or 8-way TP along them reads exactly its part; along the last dim into 4 where 8 would
  make rows shorter than :data:`MIN_ROW_BYTES`), then the leading dims, and the last dim only if
  nothing else is left: a tile keeps whole rows, so a full load copies long runs.
* **Fallback.** When the shard boundaries admit no sensible grid (e.g. uneven splits whose
  boundaries have a gcd of 1 along a long dimension), each saved box becomes its own zarr3
  array ``<name>/part_<o0>_<o1>...`` under a zarr3 group ``<name>``, placed by its offsets;
  it loads exactly like any other chunk.
* **Dtypes.** Every torch dtype that zarr3 in TensorStore knows is stored as itself
  (``bfloat16``, ``bool``, ``complex64``, ``float8_*`` included); others (e.g.
  ``complex32``, bit-packed types) are stored bit-cast to an unsigned integer of the same
  width, the real dtype recorded in the array's ``attributes`` and in the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

__all__ = [
    "MAX_NAME",
    "OBJECTS_DIR",
    "array_name",
    "object_path",
    "StoredDtype",
    "stored_dtype",
    "torch_dtype_name",
    "Grid",
    "grid_for",
    "ArrayPlan",
    "part_name",
    "plan_array",
    "chunk_shape_for",
    "chunk_count",
    "array_json",
    "SPLIT_PARTS",
    "MIN_ROW_BYTES",
    "split_parts",
    "split_boundaries",
]

#: longest array/object name (bytes) before it is shortened to a prefix + hash
MAX_NAME = 200
#: smallest target size of the chunks inside a zarr3 shard
MIN_INNER = 64 * 1024
#: parts a dim that the save planner says loads may split is cut into (exact 2/4/8-way loads)
SPLIT_PARTS = 8
#: shortest tile row (bytes) that cutting the last dim into SPLIT_PARTS (not 4) may make: reading a
#: tile into a tensor copies row by row, and short rows copy slower (``docs/benchmarks.md``)
MIN_ROW_BYTES = 2048
#: directory of the non-tensor items (``BytesIO`` / pickled objects)
OBJECTS_DIR = "__objects"

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _escape_char(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8"))


def array_name(fqn: str) -> str:
    """The path segment of ``fqn``'s array (or object) under the checkpoint root.

    Injective (percent-escaping) up to :data:`MAX_NAME` bytes; longer names keep a readable
    prefix and end in ``~`` + 16 hex digits of the FQN's SHA-256 (``~`` never appears in an
    escaped name, so shortened names cannot collide with plain ones).
    """
    if fqn == "":
        return "%"  # a lone '%' is never produced by escaping
    out = "".join(c if c in _SAFE else _escape_char(c) for c in fqn)
    if out[0] == "." or out.startswith("__"):
        out = _escape_char(out[0]) + out[1:]
    if out == "zarr.json":  # would shadow the root group's metadata
        out = "zarr%2Ejson"
    if len(out) > MAX_NAME:
        digest = hashlib.sha256(fqn.encode("utf-8")).hexdigest()[:16]
        cut = out[:MAX_NAME - 17]
        cut = cut[:cut.rfind("%")] if "%" in cut[-2:] else cut  # never split an escape
        out = f"{cut}~{digest}"
    return out


def object_path(fqn: str) -> str:
    """Where the non-tensor item ``fqn`` is stored, relative to the checkpoint root."""
    return f"{OBJECTS_DIR}/{array_name(fqn)}"


@dataclass(frozen=True)
class StoredDtype:
    """How a torch dtype is stored: the zarr3 ``data_type``, and whether it is a bit-cast."""

    zarr: str
    bitcast: bool = False


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


_NATIVE = {
    torch.bool: "bool", torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16",
    torch.int32: "int32", torch.int64: "int64", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.float32: "float32", torch.float64: "float64", torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
              "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _NATIVE[getattr(torch, _name)] = _name
_UINT_BY_SIZE = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def stored_dtype(dtype: torch.dtype) -> StoredDtype:
    """The zarr3 data type ``dtype`` is stored as (bit-cast to ``uintN`` when zarr3 lacks it).

    Raises ``TypeError`` for dtypes that cannot be stored bit-exactly (quantized tensors).
    """
    if dtype in _NATIVE:
        return StoredDtype(_NATIVE[dtype])
    if str(dtype).startswith("torch.q"):  # quantized: the bits alone lose scale and zero point
        raise TypeError(f"quantized dtype {dtype} cannot be stored in a zarr3 array")
    size = torch._utils._element_size(dtype)
    if size not in _UINT_BY_SIZE:
        raise TypeError(f"dtype {dtype} ({size}-byte elements) has no zarr3 equivalent to bit-cast to")
    return StoredDtype(_UINT_BY_SIZE[size], bitcast=True)


def _divisors_desc(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def _next_smaller(ext: int, bound: int | None) -> int | None:
    """The largest allowed extent at most half of ``ext``: a divisor of ``bound`` when the dim
    has inner box boundaries (every allowed extent divides their gcd), else ``ceil(ext/2)``."""
    if ext <= 1:
        return None
    if bound is None:
        return (ext + 1) // 2
    for d in _divisors_desc(bound):
        if d <= ext // 2:
            return d
    return None


def split_parts(size: int, itemsize: int, last: bool) -> int:
    """Into how many parts a dim of ``size`` that later loads may cut is tiled: :data:`SPLIT_PARTS`,
    or for the last dim fewer while a part's row would be under :data:`MIN_ROW_BYTES`, but never
    fewer than 4 (a 4-way load always reads exactly its part, as with the square tiles)."""
    parts = SPLIT_PARTS
    while last and parts > 4 and -(-size // parts) * itemsize < MIN_ROW_BYTES:
        parts //= 2
    return parts


def split_boundaries(size: int, segments: Sequence[int] | None, parts: int) -> set[int]:
    """The cuts of an even ``parts``-way split of a dim of ``size`` (of each fused segment on its
    own when ``segments`` sum to ``size``), and the segment boundaries; for each way (2, 4, ...
    ``parts``) only where it divides evenly."""
    segs = list(segments) if segments and sum(segments) == size else [size]
    cuts: set[int] = set(itertools.accumulate(segs))
    start = 0
    for seg in segs:
        way = 2
        while way <= parts and seg % way == 0:
            cuts.update(start + k * (seg // way) for k in range(1, way))
            way *= 2
        start += seg
    return {c for c in cuts if 0 < c < size}


def chunk_shape_for(shape: Sequence[int], bounds: Sequence[int | None], itemsize: int,
                    target_bytes: int, split: Iterable[int] | None = None,
                    whole: Sequence[int] | None = None) -> list[int]:
    """A chunk shape of at most ``target_bytes`` (where the bounds allow) for an array of
    ``shape``; along dim ``d`` the extent divides ``bounds[d]`` (the gcd of inner box
    boundaries) or, when ``bounds[d]`` is None, is free.

    ``split`` None (nothing known about later loads): largest extent split first, and a split
    that would shrink an extent more than 4x is taken only if no other dim can split, so tiles
    are about square and a load may cut any dim. ``split`` given (the dims later loads may cut,
    from the save planner's layout): those dims first, down to 1/:data:`SPLIT_PARTS` of the
    tensor's size (``whole``, default ``shape``; the last dim in 4 parts where 8 would make rows
    shorter than :data:`MIN_ROW_BYTES`: :func:`split_parts`), then the leading dims, then the split dims
    further, and the last dim only when nothing else can split."""
    ext = [bounds[d] if bounds[d] else max(1, shape[d]) for d in range(len(shape))]
    if split is None:
        while math.prod(ext) * itemsize > target_bytes:
            order = sorted(range(len(ext)), key=lambda d: -ext[d])  # stable: outer dim first on ties
            steps = [(d, n) for d in order if (n := _next_smaller(ext[d], bounds[d])) is not None]
            if not steps:
                break
            d, n = next(((d, n) for d, n in steps if n * 4 >= ext[d]), steps[0])
            ext[d] = n
        return ext
    whole = list(whole if whole is not None else shape)
    hinted = sorted({d for d in split if 0 <= d < len(shape)})
    last = len(shape) - 1
    limit = {d: -(-whole[d] // split_parts(whole[d], itemsize, d == last)) for d in hinted}
    phases = [
        hinted,                                                          # to SPLIT_PARTS parts
        [d for d in range(len(shape)) if d not in limit and d != last],  # the leading dims
        hinted,                                                          # the split dims further
        [d for d in range(len(shape)) if d not in limit],                # the last dim
        list(range(len(shape))),                                         # anything, any step
    ]
    for phase, dims in enumerate(phases):
        dims = list(dims)
        while dims and math.prod(ext) * itemsize > target_bytes:
            d = max(dims, key=lambda k: (ext[k], -k))  # largest extent, outer dim first on ties
            n = _next_smaller(ext[d], bounds[d])
            # before the last resort, a step that shrinks an extent more than 4x only if the chunk
            # stays over a quarter of the target (a prime bound would jump to 1: a chunk per row)
            big_step = n is not None and n * 4 < ext[d] and \
                math.prod(ext) // ext[d] * n * itemsize < target_bytes // 4
            if n is None or (phase == 0 and ext[d] <= limit[d]) or (phase < 4 and big_step):
                dims.remove(d)
                continue
            ext[d] = n
    return ext


def _honoured_cuts(shape: Sequence[int], bounds: Sequence[int | None], itemsize: int, target_bytes: int,
                   split: Iterable[int], cuts: Sequence[int | None], whole: Sequence[int] | None) -> list[int | None]:
    """``cuts`` where a divisor of the cut lies within 4x of the extent the target gives without
    it (so honouring the cut keeps chunks over a quarter of the target size), None elsewhere
    (e.g. an odd size's 2-way cut whose half is prime would make one-row chunks)."""
    base = chunk_shape_for(shape, bounds, itemsize, target_bytes, split, whole)
    out: list[int | None] = []
    for d, g in enumerate(cuts):
        if g is None:
            out.append(None)
            continue
        e = next((k for k in _divisors_desc(g) if k <= base[d]), 1)
        out.append(g if 4 * e >= base[d] else None)
    return out


def chunk_count(shape: Sequence[int], chunk: Sequence[int]) -> int:
    """Number of chunks of a ``chunk`` grid over ``shape``."""
    return math.prod(-(-s // c) for s, c in zip(shape, chunk))


@dataclass(frozen=True)
class Grid:
    """A zarr3 chunk grid: ``chunk`` (the write unit: one file/object each) and, when chunks
    are zarr3 shards, ``inner`` (the unit of checksums, compression and partial reads)."""

    chunk: list[int]
    inner: list[int] | None = None


def _gcd(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else math.gcd(a, b)


def grid_for(shape: Sequence[int], bounds: Sequence[int | None], itemsize: int, chunk_bytes: int,
             shard_bytes: int | None, split: Iterable[int] | None = None,
             cuts: Sequence[int | None] | None = None) -> Grid:
    """The grid of an array of ``shape`` (``bounds`` as in :func:`chunk_shape_for`): shards
    of about ``shard_bytes`` holding chunks of about ``chunk_bytes``, or plain chunks when
    ``shard_bytes`` is None/0 or a shard would hold a single chunk; ``split`` as in
    :func:`chunk_shape_for`; ``cuts``: per dim, a length every chunk (the read unit) must divide
    so that later loads read exactly (files need only follow ``bounds``)."""
    cuts = list(cuts) if cuts is not None else [None] * len(shape)
    if not shard_bytes:
        if split is not None and any(c is not None for c in cuts):
            cuts = _honoured_cuts(shape, bounds, itemsize, chunk_bytes, split, cuts, None)
        return Grid(chunk_shape_for(shape, [_gcd(b, c) for b, c in zip(bounds, cuts)], itemsize, chunk_bytes, split))
    outer = chunk_shape_for(shape, bounds, itemsize, shard_bytes, split)
    nbytes = math.prod(outer) * itemsize
    target = min(chunk_bytes, max(MIN_INNER, nbytes // 16))
    if split is not None and any(c is not None for c in cuts):
        cuts = _honoured_cuts(outer, outer, itemsize, target, split, cuts, shape)
    inner_bounds = [_gcd(o, c) for o, c in zip(outer, cuts)]
    if not shape or 0 in shape or (nbytes <= chunk_bytes and inner_bounds == outer):
        return Grid(outer)
    # a shard has at least ~16 chunks (down to MIN_INNER bytes each: ``target`` above), so a
    # partial read of a quarter of a small tensor along any dim fetches about a quarter of it
    inner = chunk_shape_for(outer, inner_bounds, itemsize, target, split, shape)  # inner chunks tile a shard
    return Grid(outer, None if inner == outer else inner)


@dataclass
class ArrayPlan:
    """How one global tensor is laid out: one array (``parts`` empty) or, in the fallback,
    one array per saved box (``parts``: box offsets -> (part name, box sizes, its grid))."""

    fqn: str
    name: str
    shape: list[int]
    dtype: torch.dtype
    grid: Grid
    parts: dict[tuple[int, ...], tuple[str, list[int], Grid]] = field(default_factory=dict)

    @property
    def per_box(self) -> bool:
        return bool(self.parts)

    def location(self, offsets: Sequence[int]) -> tuple[str, list[int]]:
        """``(array path, origin)`` of the box saved at ``offsets``: where its data lives and the
        global index of that array's element 0."""
        if not self.parts:
            return self.name, [0] * len(self.shape)
        name, _sizes, _grid = self.parts[tuple(offsets)]
        return f"{self.name}/{name}", list(offsets)

    def arrays(self) -> list[tuple[str, list[int], Grid]]:
        """Every zarr3 array of this tensor: ``(path, shape, grid)``."""
        if not self.parts:
            return [(self.name, self.shape, self.grid)]
        return [(f"{self.name}/{n}", s, g) for n, s, g in self.parts.values()]


def part_name(offsets: Sequence[int]) -> str:
    """Name of the fallback array of the box at ``offsets`` (``part_0_1024``)."""
    return "part_" + "_".join(str(o) for o in offsets) if offsets else "part"


def plan_array(fqn: str, shape: Sequence[int], dtype: torch.dtype,
               boxes: Iterable[tuple[Sequence[int], Sequence[int]]], chunk_bytes: int,
               shard_bytes: int | None = None, mode: str = "auto",
               split: Mapping[int, Sequence[int] | None] | None = None) -> ArrayPlan:
    """Lay out one global tensor of ``shape`` saved as ``boxes`` ((offsets, sizes) of every
    rank's chunks). ``mode``: ``"auto"`` (one array unless its grid would need more than
    twice the files of storing each box apart), ``"global"`` (always one array) or
    ``"per_box"`` (always one array per box). ``split``: the dims a later load may cut, each with
    its fused segments' sizes or None (:func:`~dcp_ext.save_dedup.split_hints`); None: unknown.
    The cuts of 2/4/8-way splits (of every fused segment on its own) bound the read units: the
    chunks (with shards, the chunks inside them: the shard files follow the saved boxes only)."""
    shape = list(shape)
    boxes = [(list(o), list(s)) for o, s in boxes]
    itemsize = torch._utils._element_size(dtype)
    bounds: list[int | None] = []
    cuts: list[int | None] = []
    for d, size in enumerate(shape):
        inner = {b for o, s in boxes for b in (o[d], o[d] + s[d]) if 0 < b < size}
        bounds.append(math.gcd(*inner) if inner else None)
        # where a 2/4/8-way load would cut a split dim: boundaries of the read units (not the files)
        at = split_boundaries(size, split[d], split_parts(size, itemsize, d == len(shape) - 1)) \
            if split is not None and d in split else set()
        cuts.append(math.gcd(*at) if at else None)
    dims = None if split is None else list(split)
    grid = grid_for(shape, bounds, itemsize, chunk_bytes, shard_bytes, dims, cuts)
    plan = ArrayPlan(fqn, array_name(fqn), shape, dtype, grid)
    if mode == "global" or len(boxes) <= 1 or not shape:
        return plan
    parts = {tuple(o): (part_name(o), s, grid_for(s, [None] * len(s), itemsize, chunk_bytes, shard_bytes, dims))
             for o, s in boxes}
    apart = sum(chunk_count(s, g.chunk) for _n, s, g in parts.values())
    if mode == "per_box" or chunk_count(shape, grid.chunk) > 2 * apart:
        plan.parts = parts
    return plan


def _fill_value(data_type: str) -> bool | int | float | list[float]:
    """The zarr3 ``fill_value`` TensorStore writes for ``data_type`` (its zero)."""
    if data_type == "bool":
        return False
    if data_type.startswith(("int", "uint")):
        return 0
    if data_type.startswith("complex"):
        return [0.0, 0.0]
    return 0.0


def _as_written(codecs: list[dict]) -> list[dict]:
    """``codecs`` as TensorStore writes them: a shard's ``index_location`` left out when it is
    the default (``"end"``)."""
    out = []
    for c in codecs:
        if c.get("name") == "sharding_indexed":
            conf = {k: v for k, v in c["configuration"].items() if (k, v) != ("index_location", "end")}
            conf["codecs"] = _as_written(conf["codecs"])
            c = {**c, "configuration": conf}
        out.append(c)
    return out


def array_json(metadata: dict) -> bytes:
    """The ``zarr.json`` of an array with zarr3 ``metadata`` (as
    :func:`~dcp_ext.storage.tensorstore.arrays.array_metadata` builds it): byte for byte what
    TensorStore writes when it creates the array (the metadata plus ``fill_value`` 0,
    ``node_type`` and ``zarr_format``; defaults left out; keys sorted, no spaces, UTF-8). On local files the writer
    writes it itself: creating an array through TensorStore took ~2 ms each, 45 ms of a
    768 MiB, 20-tensor save on tmpfs."""
    doc = {**metadata, "codecs": _as_written(metadata["codecs"]), "fill_value": _fill_value(metadata["data_type"]),
           "node_type": "array", "zarr_format": 3}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
