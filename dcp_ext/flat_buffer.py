"""ZeRO-style flat buffers: a data-parallel rank's slice of concatenated parameters, as boxes.

A ZeRO-1/2 (Megatron distributed-optimizer) rank holds a slice of a flat buffer in which the
parameters are concatenated, padded and bucketed. :class:`FlatBufferSpec` describes that slice
(pure data, no torch.distributed); each parameter's part of it is a 1-D range of the flattened
parameter, which :func:`range_to_boxes` cuts into rectangular boxes, each a contiguous run of the
flat buffer (:func:`flat_views` gives writable views of them). :func:`pack_flat` /
:func:`unpack_flat` copy between full parameters and a slice. :mod:`dcp_ext.optim` turns the
boxes into DCP chunks of the global parameters; this module knows nothing of DCP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .errors import OptimizerStateError

__all__ = [
    "Box",
    "FlatBufferSpec",
    "FlatParam",
    "FlatSegment",
    "box_flat_range",
    "flat_views",
    "max_boxes",
    "pack_flat",
    "range_to_boxes",
    "unpack_flat",
]

# --------------------------------------------------------------------------------------
# Ragged 1-D ranges of a C-order flattened tensor -> rectangular boxes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A rectangular box of an N-d tensor that is also a contiguous run of its C-order flattening.

    ``flat_start`` is the flat (C-order) index of the box's first element; the box covers
    ``[flat_start, flat_start + numel)``.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    flat_start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def max_boxes(ndim: int) -> int:
    """The most boxes :func:`range_to_boxes` returns for an ``ndim``-d shape: ``max(1, 2*ndim - 1)``.

    1 for 0-d/1-d, 3 for 2-d (partial first row, full middle rows, partial last row), and in
    general one partial run per dimension on each side plus one block of full slabs.
    """
    return max(1, 2 * ndim - 1)


def _check_range(shape: tuple[int, ...], start: int, end: int) -> int:
    numel = math.prod(shape)
    if any(s < 0 for s in shape):
        raise OptimizerStateError(f"negative size in shape {shape}")
    if not (0 <= start <= end <= numel):
        raise OptimizerStateError(
            f"flat range [{start}, {end}) is out of bounds for shape {shape} (numel {numel}); "
            f"need 0 <= start <= end <= {numel}"
        )
    return numel


def range_to_boxes(shape: Sequence[int], start: int, end: int) -> list[Box]:
    """Cut the flat range ``[start, end)`` of a C-order flattened ``shape`` into rectangular boxes.

    The boxes are disjoint, in flat order, each a contiguous run of the flat range, and
    together cover it exactly. At most :func:`max_boxes` ``(len(shape))`` boxes (3 for a 2-d
    shape). An empty range gives no boxes.
    """
    shape = tuple(int(s) for s in shape)
    _check_range(shape, start, end)
    out: list[Box] = []
    if start == end:
        return out
    if len(shape) == 0:
        return [Box((), (), 0)]

    def rec(dims: tuple[int, ...], prefix: tuple[int, ...], base: int, a: int, b: int) -> None:
        # [a, b) is relative to the sub-tensor at index `prefix`, whose flat start is `base`.
        if a >= b:
            return
        rest, ones = dims[1:], (1,) * len(prefix)
        inner = math.prod(rest)
        if not rest or inner == 0:
            out.append(Box(prefix + (a,) + (0,) * len(rest), ones + (b - a,) + rest, base + a))
            return
        if a % inner == 0 and b % inner == 0:  # whole slabs
            out.append(Box(prefix + (a // inner,) + (0,) * len(rest), ones + ((b - a) // inner,) + rest, base + a))
            return
        first, last = a // inner, (b - 1) // inner
        if first == last:  # inside one slab: recurse with this index fixed
            rec(rest, prefix + (first,), base + first * inner, a - first * inner, b - first * inner)
            return
        head_end = (first + 1) * inner if a % inner else a
        if a % inner:
            rec(rest, prefix + (first,), base + first * inner, a - first * inner, inner)
        mid_end = (b // inner) * inner
        if mid_end > head_end:
            out.append(Box(prefix + (head_end // inner,) + (0,) * len(rest),
                           ones + ((mid_end - head_end) // inner,) + rest, base + head_end))
        if b % inner:
            rec(rest, prefix + (b // inner,), base + mid_end, 0, b - mid_end)

    rec(shape, (), 0, start, end)
    return out


def box_flat_range(shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int]) -> tuple[int, int]:
    """Inverse of :func:`range_to_boxes` for one box: the flat range ``[a, b)`` a box covers.

    Raises :class:`OptimizerStateError` if the box is out of bounds or is not a contiguous
    run of the flattened tensor (then no single flat range describes it).
    """
    shape, offsets, sizes = tuple(shape), tuple(offsets), tuple(sizes)
    if not (len(shape) == len(offsets) == len(sizes)):
        raise OptimizerStateError(f"box offsets {offsets} / sizes {sizes} do not match shape {shape}")
    for d, (n, o, s) in enumerate(zip(shape, offsets, sizes)):
        if o < 0 or s < 0 or o + s > n:
            raise OptimizerStateError(f"box offsets {offsets} sizes {sizes} out of bounds of shape {shape} (dim {d})")
    numel = math.prod(sizes)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    a = sum(o * st for o, st in zip(offsets, strides))
    if numel == 0:
        return a, a
    # contiguous iff every dim after the first one with size != 1 is taken whole
    first = next((i for i, s in enumerate(sizes) if s != 1), len(sizes))
    if any(sizes[j] != shape[j] for j in range(first + 1, len(shape))):
        raise OptimizerStateError(
            f"box offsets {offsets} sizes {sizes} is not a contiguous run of the C-order flattening of {shape}"
        )
    return a, a + numel


def flat_views(flat: torch.Tensor, shape: Sequence[int], start: int, end: int) -> list[tuple[Box, torch.Tensor]]:
    """Boxes of ``[start, end)`` of ``shape``, each with a view of ``flat`` (a 1-D tensor holding
    exactly that range) reshaped to the box: writing to the views writes the flat buffer."""
    if flat.dim() != 1 or flat.numel() != end - start:
        raise OptimizerStateError(
            f"flat tensor of shape {tuple(flat.shape)} cannot hold range [{start}, {end}) (needs 1-D of {end - start})"
        )
    return [(b, flat[b.flat_start - start: b.flat_start - start + b.numel].view(b.sizes))
            for b in range_to_boxes(shape, start, end)]


# --------------------------------------------------------------------------------------
# Flat buffers (ZeRO-1/2 / distributed optimizer)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatParam:
    """One parameter inside a flat buffer: its (local) FQN, shape and element offset."""

    fqn: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatSegment:
    """The part of one parameter that lies in a rank's slice.

    ``[param_start, param_end)`` is the range of the flattened parameter; ``local_offset`` is
    where it starts in the rank's local (concatenated) slice buffer.
    """

    fqn: str
    shape: tuple[int, ...]
    param_start: int
    param_end: int
    local_offset: int


@dataclass(frozen=True)
class FlatBufferSpec:
    """A data-parallel rank's slice of a ZeRO-1/2 flat buffer (pure data).

    The buffer concatenates ``params`` (each at its ``offset``, gaps are padding) and is
    ``numel`` elements long. ``buckets`` are ``[start, end)`` boundaries (each parameter lies in
    one bucket); ``ranges`` are this rank's ``[start, end)`` ranges of the buffer, in the order
    they are concatenated in the rank's local slice (one per bucket in Megatron's scheme, a single
    ``[start, end)`` with one bucket). Build the usual layout with :meth:`build`.
    """

    params: tuple[FlatParam, ...]
    numel: int
    ranges: tuple[tuple[int, int], ...]
    buckets: tuple[tuple[int, int], ...] = ()
    alignment: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(
            p if isinstance(p, FlatParam) else FlatParam(str(p[0]), tuple(int(s) for s in p[1]), int(p[2]))
            for p in self.params))
        object.__setattr__(self, "ranges", tuple((int(a), int(b)) for a, b in self.ranges))
        object.__setattr__(self, "buckets", tuple((int(a), int(b)) for a, b in self.buckets))
        if self.alignment < 1:
            raise OptimizerStateError(f"FlatBufferSpec alignment must be >= 1, got {self.alignment}")
        if not (0 <= self.dp_rank < self.dp_size):
            raise OptimizerStateError(f"FlatBufferSpec dp_rank {self.dp_rank} not in [0, dp_size={self.dp_size})")
        seen: set[str] = set()
        prev_end, prev_fqn = 0, None
        for p in self.params:
            if p.fqn in seen:
                raise OptimizerStateError(f"FlatBufferSpec lists parameter {p.fqn!r} twice")
            seen.add(p.fqn)
            if any(s < 0 for s in p.shape):
                raise OptimizerStateError(f"parameter {p.fqn!r} has a negative size in shape {p.shape}")
            if p.offset < prev_end:
                raise OptimizerStateError(
                    f"parameter {p.fqn!r} at offset {p.offset} overlaps {prev_fqn!r} (ends at {prev_end}); "
                    "params must be in buffer order and disjoint")
            prev_end, prev_fqn = p.offset + p.numel, p.fqn
        if prev_end > self.numel:
            raise OptimizerStateError(
                f"parameter {prev_fqn!r} ends at {prev_end}, beyond the buffer size numel={self.numel}")
        self._check_intervals(self.ranges, "range")
        self._check_intervals(sorted(self.buckets), "bucket")
        for p in self.params:
            if self.buckets and p.numel and not any(a <= p.offset and p.offset + p.numel <= b for a, b in self.buckets):
                raise OptimizerStateError(
                    f"parameter {p.fqn!r} [{p.offset}, {p.offset + p.numel}) does not lie inside one bucket "
                    f"of {list(self.buckets)}")

    def _check_intervals(self, intervals: Iterable[tuple[int, int]], what: str) -> None:
        done: list[tuple[int, int]] = []
        for a, b in intervals:
            if not (0 <= a <= b <= self.numel):
                raise OptimizerStateError(
                    f"FlatBufferSpec {what} [{a}, {b}) is out of bounds of the buffer [0, {self.numel})")
            for c, d in done:
                if a < d and c < b:
                    raise OptimizerStateError(f"FlatBufferSpec {what} [{a}, {b}) overlaps {what} [{c}, {d})")
            done.append((a, b))

    # -- construction ------------------------------------------------------------------
    @classmethod
    def build(cls, params: Sequence[tuple[str, Sequence[int]]], *, dp_size: int = 1, dp_rank: int = 0,
              alignment: int = 1, bucket_numel: int | None = None) -> "FlatBufferSpec":
        """Lay out ``params`` (``(fqn, shape)`` in order) like Megatron's distributed optimizer.

        Each parameter starts at a multiple of ``alignment``; a new bucket starts once the
        current one holds at least ``bucket_numel`` elements (one bucket if ``None``); each
        bucket is padded to a multiple of ``dp_size * alignment`` and split into ``dp_size``
        equal shards; rank ``dp_rank`` owns shard ``dp_rank`` of every bucket.
        """
        if dp_size < 1:
            raise OptimizerStateError(f"dp_size must be >= 1, got {dp_size}")
        if alignment < 1:
            raise OptimizerStateError(f"alignment must be >= 1, got {alignment}")
        if bucket_numel is not None and bucket_numel < 1:
            raise OptimizerStateError(f"bucket_numel must be >= 1 or None, got {bucket_numel}")
        if not params:
            raise OptimizerStateError("FlatBufferSpec.build needs at least one parameter")
        unit = dp_size * alignment
        flat: list[FlatParam] = []
        buckets: list[tuple[int, int]] = []
        pos = bstart = 0
        for fqn, shape in params:
            shape = tuple(int(s) for s in shape)
            pos = -(-pos // alignment) * alignment
            flat.append(FlatParam(fqn, shape, pos))
            pos += math.prod(shape)
            if bucket_numel is not None and pos - bstart >= bucket_numel:
                end = bstart + max(unit, -(-(pos - bstart) // unit) * unit)
                buckets.append((bstart, end))
                pos = bstart = end
        if pos > bstart or not buckets:
            buckets.append((bstart, bstart + max(unit, -(-(pos - bstart) // unit) * unit)))
        numel = buckets[-1][1]
        ranges = []
        for a, b in buckets:
            shard = (b - a) // dp_size
            ranges.append((a + dp_rank * shard, a + (dp_rank + 1) * shard))
        return cls(tuple(flat), numel, tuple(ranges), tuple(buckets), alignment, dp_rank, dp_size)

    # -- queries -------------------------------------------------------------------------
    @property
    def start(self) -> int:
        """Start of this rank's range (only for a single range)."""
        return self._single()[0]

    @property
    def end(self) -> int:
        """End of this rank's range (only for a single range)."""
        return self._single()[1]

    def _single(self) -> tuple[int, int]:
        if len(self.ranges) != 1:
            raise OptimizerStateError(f"this rank owns {len(self.ranges)} ranges {list(self.ranges)}; use .ranges")
        return self.ranges[0]

    @property
    def local_numel(self) -> int:
        """Length of this rank's local slice buffer (its ranges concatenated, padding included)."""
        return sum(b - a for a, b in self.ranges)

    def segments(self) -> list[FlatSegment]:
        """Each parameter's part of this rank's slice, in local-buffer order (padding skipped)."""
        out: list[FlatSegment] = []
        local = 0
        for a, b in self.ranges:
            for p in self.params:
                lo, hi = max(a, p.offset), min(b, p.offset + p.numel)
                if lo < hi:
                    out.append(FlatSegment(p.fqn, p.shape, lo - p.offset, hi - p.offset, local + lo - a))
            local += b - a
        return out


def pack_flat(spec: FlatBufferSpec, tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy this rank's parts of ``tensors`` (full local parameters by FQN) into its slice buffer.

    Padding is zero in a new buffer and left untouched in ``out``.
    """
    if out is None:
        if dtype is None:
            dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        out = torch.zeros(spec.local_numel, dtype=dtype)
    elif out.dim() != 1 or out.numel() != spec.local_numel:
        raise OptimizerStateError(f"slice buffer has shape {tuple(out.shape)}, expected ({spec.local_numel},)")
    for seg in spec.segments():
        t = _lookup(tensors, seg)
        out[seg.local_offset: seg.local_offset + seg.param_end - seg.param_start].copy_(
            t.reshape(-1)[seg.param_start: seg.param_end])
    return out


def unpack_flat(spec: FlatBufferSpec, flat: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`pack_flat`: copy this rank's slice into the matching parts of ``tensors``."""
    if flat.dim() != 1 or flat.numel() != spec.local_numel:
        raise OptimizerStateError(f"slice buffer has shape {tuple(flat.shape)}, expected ({spec.local_numel},)")
    for seg in spec.segments():
        t = _lookup(tensors, seg)
        if not t.is_contiguous():
            raise OptimizerStateError(f"tensor {seg.fqn!r} must be contiguous to receive its flat slice")
        t.view(-1)[seg.param_start: seg.param_end].copy_(
            flat[seg.local_offset: seg.local_offset + seg.param_end - seg.param_start])


def _lookup(tensors: Mapping[str, torch.Tensor], seg: FlatSegment) -> torch.Tensor:
    t = tensors.get(seg.fqn)
    if t is None:
        raise OptimizerStateError(f"no tensor for flat-buffer parameter {seg.fqn!r}; have {sorted(tensors)[:10]}")
    if tuple(t.shape) != seg.shape:
        raise OptimizerStateError(
            f"tensor {seg.fqn!r} has shape {tuple(t.shape)} but the FlatBufferSpec says {seg.shape}")
    return t
