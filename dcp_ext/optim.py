"""Optimizer state for DCP: FQN-keyed per-parameter state and ZeRO-style flat buffers.

Torch optimizers key their state by parameter *position*, which breaks as soon as the model
layout changes. This module presents optimizer state keyed by the parameters' (global) FQNs:

* :func:`optimizer_state` wraps ``(model, optimizer)`` into a DCP ``Stateful`` whose state is
  ``{"state": {fqn: {"exp_avg": t, "exp_avg_sq": t, "step": t, ...}}, "param_groups": [...]}``.
  With a :class:`~dcp_ext.layout.ParallelLayout`, per-parameter states of TP-sharded or
  pipeline-staged parameters become :class:`~dcp_ext.layout.GlobalPieces` of the *global*
  parameter, so they reshard exactly like the weights with the Reshard planners.
* :class:`FlatBufferSpec` describes a data-parallel rank's slice of a ZeRO-1/2 flat buffer
  (parameters concatenated, padded, bucketed, each bucket split evenly over DP ranks). Each
  parameter's part of a slice is a 1-D range of the flattened parameter, which
  :func:`range_to_boxes` cuts into rectangular boxes, each a contiguous run of the flat buffer.
  So a ZeRO slice is saved as ordinary DCP chunks of the global parameters and any other DP
  size (and TP/PP layout) fills its slice from the overlapping chunks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch

from .errors import DcpExtError

if TYPE_CHECKING:  # pragma: no cover
    from .layout import GlobalPieces, ParallelLayout

__all__ = [
    "Box",
    "FlatParam",
    "FlatBufferSpec",
    "FlatSegment",
    "OptimizerStateError",
    "range_to_boxes",
    "box_flat_range",
    "max_boxes",
    "flat_views",
    "pack_flat",
    "unpack_flat",
    "OptimizerState",
    "flat_state_pieces",
    "optimizer_state",
]

logger = logging.getLogger(__name__)


class OptimizerStateError(DcpExtError, ValueError):
    """Optimizer state or a flat-buffer description does not fit the model/optimizer."""


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


# --------------------------------------------------------------------------------------
# FQN-keyed optimizer state (a DCP Stateful)
# --------------------------------------------------------------------------------------

_PIECES_TYPES = None


def _layout_types():
    """(GlobalPieces, Piece) from dcp_ext.layout, imported lazily (only needed with a layout)."""
    global _PIECES_TYPES
    if _PIECES_TYPES is None:
        try:
            from .layout import GlobalPieces, Piece
        except ImportError as e:  # pragma: no cover - layout ships with the package
            raise OptimizerStateError("dcp_ext.layout (GlobalPieces/Piece) is needed for layout-aware state") from e
        _PIECES_TYPES = (GlobalPieces, Piece)
    return _PIECES_TYPES


def _param_fqns(model: torch.nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for fqn, p in model.named_parameters():
        out.setdefault(id(p), fqn)
    return out


def _is_flat_optimizer(optimizer: object) -> bool:
    return hasattr(optimizer, "flat_spec") and hasattr(optimizer, "flat_state") and hasattr(optimizer, "scalar_state")


def _all_gather_objects(obj: object, group: object | None = None, no_dist: bool = False) -> list[object]:
    import torch.distributed as dist

    if no_dist or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _init_lazy_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of parameters that have none yet (no step taken), equivalent to fresh state.

    Runs one ``step()`` on zero gradients with ``lr`` and ``weight_decay`` set to 0 for just those
    parameters (the others get no gradient, so they are not touched), then resets their ``step``
    counters to 0. For Adam/AdamW (zero moments) and SGD momentum (zero buffer, dampening 0) the
    result behaves exactly like a never-stepped optimizer.
    """
    missing = [p for g in optimizer.param_groups for p in g["params"]
               if p.requires_grad and len(optimizer.state.get(p, {})) == 0]
    if not missing:
        return
    missing_ids = {id(p) for p in missing}
    saved_grads = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            saved_grads[id(p)] = p.grad
            p.grad = torch.zeros_like(p) if id(p) in missing_ids else None
    saved_hyper = []
    for g in optimizer.param_groups:
        saved_hyper.append({k: g[k] for k in ("lr", "weight_decay") if k in g})
        for k in ("lr", "weight_decay"):
            if k in g:
                g[k] = torch.tensor(0.0) if isinstance(g[k], torch.Tensor) else 0.0
    try:
        with torch.no_grad():
            optimizer.step()
    finally:
        for g, h in zip(optimizer.param_groups, saved_hyper):
            g.update(h)
            for p in g["params"]:
                p.grad = saved_grads[id(p)]
    for p in missing:
        st = optimizer.state.get(p, {})
        if "step" in st:
            if isinstance(st["step"], torch.Tensor):
                st["step"].zero_()
            else:
                st["step"] = 0
    logger.debug("initialised lazy optimizer state of %d parameters", len(missing))


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _is_whole(mapping: object, local_shape: Sequence[int]) -> bool:
    """True if a TensorMapping is the whole tensor (not split across TP ranks)."""
    return len(mapping.pieces) == 1 and tuple(mapping.global_shape) == tuple(local_shape)


def _box_slices(offsets: Sequence[int], sizes: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


class OptimizerState:
    """A DCP ``Stateful`` presenting an optimizer's state keyed by (global) parameter FQNs.

    ``state_dict()`` returns ``{"state": {fqn: {name: value}}, "param_groups": [{"params":
    [fqn, ...], **hyper_parameters}]}``. Without a layout the values are the optimizer's own
    tensors (stock planners load them in place). With a ``layout``, every tensor state becomes a
    :class:`~dcp_ext.layout.GlobalPieces` named ``<key>.state.<global fqn>.<name>``: states with
    the parameter's shape are split like the parameter (its ``ShardSpec``, PP renumbering),
    other tensors (``step``) are replicated. flat-buffer (ZeRO-style) optimizers present
    their flat-buffer slices as pieces of the same global tensors, so plain and ZeRO checkpoints
    are interchangeable. ``key`` must be the key of this object in the dict given to ``dcp.save``.
    ``state_dict()`` gathers the param groups' FQNs over ``process_group`` (default: the default
    group when initialised); pass ``no_dist=True`` with ``dcp.save/load(..., no_dist=True)``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: object, layout: ParallelLayout | None = None,
                 *, key: str = "optim", init_lazy: bool = True, process_group: object | None = None,
                 no_dist: bool = False) -> None:
        self.process_group = process_group
        self.no_dist = no_dist
        self.model = model
        self.optimizer = optimizer
        self.layout = layout
        self.key = key
        self.init_lazy = init_lazy
        self._presented: dict[int, tuple[object, object]] = {}  # id -> (presented value, backing)

    # -- helpers -------------------------------------------------------------------------
    def _gfqn(self, fqn: str) -> str:
        return self.layout.global_fqn(fqn) if self.layout is not None else fqn

    def _named_groups(self) -> list[list[tuple[str, torch.Tensor]]]:
        fqns = _param_fqns(self.model)
        groups = []
        for gi, g in enumerate(self.optimizer.param_groups):
            named = []
            for pi, p in enumerate(g["params"]):
                fqn = fqns.get(id(p))
                if fqn is None:
                    raise OptimizerStateError(
                        f"optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a "
                        f"parameter of the model {type(self.model).__name__}; pass the model the optimizer was built on")
                named.append((fqn, p))
            groups.append(named)
        return groups

    def _pieces(self, local_fqn: str, name: str, t: torch.Tensor, sharded: bool):
        GlobalPieces, Piece = _layout_types()
        gname = f"{self.key}.state.{self._gfqn(local_fqn)}.{name}"
        if not sharded or t.dim() == 0:
            return GlobalPieces([Piece(gname, tuple(t.shape), (0,) * t.dim(), t)], replicated=True)
        m = self.layout.map_tensor(local_fqn, tuple(t.shape))
        pieces = [Piece(gname, tuple(m.global_shape), tuple(pm.global_offsets), t[_box_slices(pm.local_offsets, pm.sizes)])
                  for pm in m.pieces]
        # identical on several ranks: TP-replicated parameters, and every state under DP > 1
        return GlobalPieces(pieces, replicated=_is_whole(m, t.shape) or self.layout.dp_size > 1)

    def _param_groups_sd(self, group_fqns: list[list[str]], hyper: list[dict]) -> tuple[dict, ...]:
        # union of every rank's FQNs per group (PP stages hold different parameters)
        gathered = _all_gather_objects(group_fqns, self.process_group, self.no_dist)
        out = []
        for gi, h in enumerate(hyper):
            names: list[str] = []
            seen: set[str] = set()
            for rank_groups in gathered:
                if len(rank_groups) != len(hyper):
                    raise OptimizerStateError(
                        f"ranks disagree on the number of optimizer param groups ({len(rank_groups)} vs {len(hyper)})")
                for n in rank_groups[gi]:
                    if n not in seen:
                        seen.add(n)
                        names.append(n)
            out.append({"params": names, **h})
        # a tuple is one leaf for DCP: saved and loaded whole, so optimizers with different
        # hyper-parameter keys (a flat-buffer optimizer vs torch.optim.Adam) still load each other's groups
        return tuple(out)

    # -- Stateful ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The FQN-keyed state (see the class docstring); initialises lazy state first."""
        if _is_flat_optimizer(self.optimizer):
            return self._flat_state_dict()
        groups = self._named_groups()
        if self.init_lazy:
            _init_lazy_state(self.optimizer)
        state: dict[str, dict] = {}
        self._presented = {}
        for named in groups:
            for fqn, p in named:
                pstate = self.optimizer.state.get(p, {})
                entry = {}
                for name, v in pstate.items():
                    if isinstance(v, torch.Tensor):
                        sharded = tuple(v.shape) == tuple(p.shape)
                        if self.layout is None or _is_dtensor(v):
                            entry[name] = v  # stock DCP (and the Reshard planners) handle these
                        else:
                            entry[name] = self._pieces(fqn, name, v, sharded)
                        self._presented[id(entry[name])] = (entry[name], v)
                    else:
                        entry[name] = v
                state[self._gfqn(fqn)] = entry
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        fqns = [[self._gfqn(f) for f, _ in named] for named in groups]
        return {"state": state, "param_groups": self._param_groups_sd(fqns, hyper)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Apply a state from :meth:`state_dict` (as filled by ``dcp.load``) to the optimizer."""
        if _is_flat_optimizer(self.optimizer):
            return self._flat_load(state_dict)
        groups = self._named_groups()
        if self.init_lazy:
            _init_lazy_state(self.optimizer)
        self._load_groups(state_dict, [[self._gfqn(f) for f, _ in named] for named in groups],
                          self.optimizer.param_groups)
        saved_state = state_dict.get("state", {})
        for named in groups:
            for fqn, p in named:
                g = self._gfqn(fqn)
                if g not in saved_state:
                    if self.optimizer.state.get(p):
                        raise OptimizerStateError(f"optimizer state for parameter {g!r} is missing from the state dict")
                    continue
                pstate = self.optimizer.state.setdefault(p, {})
                for name, v in saved_state[g].items():
                    cur = pstate.get(name)
                    if id(v) in self._presented and self._presented[id(v)][1] is cur:
                        continue  # filled in place by dcp.load
                    if v is None and isinstance(cur, torch.Tensor):
                        raise OptimizerStateError(_DROPPED.format(f"{g!r}.{name!r}"))
                    if isinstance(v, torch.Tensor):
                        if isinstance(cur, torch.Tensor):
                            if cur.shape != v.shape:
                                raise OptimizerStateError(
                                    f"optimizer state {g!r}.{name!r}: saved shape {tuple(v.shape)} does not match "
                                    f"the optimizer's {tuple(cur.shape)} (parameter shape {tuple(p.shape)})")
                            cur.copy_(v)
                        else:
                            pstate[name] = v.clone()
                    elif _layout_types_loaded() and isinstance(v, _layout_types()[0]):
                        raise OptimizerStateError(
                            f"optimizer state {g!r}.{name!r} holds GlobalPieces not created by this OptimizerState; "
                            "call load_state_dict with the dict returned by state_dict()")
                    else:
                        pstate[name] = v

    def _load_groups(self, state_dict: Mapping, local_fqns: list[list[str]], target_groups: list[dict]) -> None:
        saved = state_dict.get("param_groups")
        if saved is None:
            raise OptimizerStateError("state dict has no 'param_groups'")
        if len(saved) != len(target_groups):
            raise OptimizerStateError(
                f"checkpoint has {len(saved)} optimizer param groups, the optimizer has {len(target_groups)}")
        where = {n: gi for gi, sg in enumerate(saved) for n in sg["params"]}
        for gi, names in enumerate(local_fqns):
            for n in names:
                if n in where and where[n] != gi:
                    raise OptimizerStateError(
                        f"parameter {n!r} is in param group {gi} of the optimizer but in group {where[n]} of the checkpoint")
        for sg, g in zip(saved, target_groups):
            for k, v in sg.items():
                if k == "params" or k not in g:  # only hyper-parameters this optimizer knows
                    continue
                if isinstance(g.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                    g[k].copy_(v)
                else:
                    g[k] = v

    # -- ZeRO / flat buffers -------------------------------------------------------------
    def _flat_state_dict(self) -> dict:
        opt = self.optimizer
        spec: FlatBufferSpec = opt.flat_spec
        pieces = flat_state_pieces(spec, opt.flat_state, opt.scalar_state, layout=self.layout, key=self.key)
        self._presented = {id(v): (v, v) for e in pieces.values() for v in e.values()}
        fqns = [[self._gfqn(p.fqn) for p in spec.params]]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        return {"state": pieces, "param_groups": self._param_groups_sd(fqns, hyper)}

    def _flat_load(self, state_dict: Mapping) -> None:
        opt = self.optimizer
        self._load_groups(state_dict, [[self._gfqn(p.fqn) for p in opt.flat_spec.params]], opt.param_groups)
        for g, entry in state_dict.get("state", {}).items():
            for name, v in entry.items():
                if v is None:
                    raise OptimizerStateError(_DROPPED.format(f"{g!r}.{name!r}"))
                if id(v) not in self._presented:
                    raise OptimizerStateError(
                        f"flat optimizer state {g!r}.{name!r} was not produced by this OptimizerState.state_dict(); "
                        "flat buffers are only loaded in place by dcp.load")
        if hasattr(opt, "after_load"):
            opt.after_load()


_DROPPED = ("optimizer state {} came back as None: the load planner dropped its GlobalPieces (stock "
            "DefaultLoadPlanner replaces objects it does not know with None); load layout-aware or ZeRO "
            "optimizer state with dcp_ext.ReshardLoadPlanner")


def _layout_types_loaded() -> bool:
    return _PIECES_TYPES is not None


def flat_state_pieces(spec: FlatBufferSpec, flat_state: Mapping[str, torch.Tensor],
                      scalar_state: Mapping[str, torch.Tensor] | None = None, *, layout: ParallelLayout | None = None,
                      key: str = "optim") -> dict[str, dict[str, GlobalPieces]]:
    """GlobalPieces of the global parameters for a rank's flat-buffer slices.

    ``flat_state`` maps a state name (``"master"``, ``"exp_avg"``, ...) to this rank's 1-D slice
    buffer (``spec.local_numel`` long). Each parameter's part of the slice is cut into at most
    :func:`max_boxes` rectangular boxes (3 for a matrix), mapped through ``layout.map_tensor``
    (TP shard, fused segments, PP renumbering) and named ``<key>.state.<global fqn>.<name>``;
    every piece's view aliases the flat buffer, so ``dcp.load`` fills the slice in place.
    ``scalar_state`` (e.g. ``{"step": t}``) is presented, replicated, for every parameter of the
    spec. Returns ``{global_fqn: {name: GlobalPieces}}``.
    """
    GlobalPieces, Piece = _layout_types()
    for name, buf in flat_state.items():
        if buf.dim() != 1 or buf.numel() != spec.local_numel:
            raise OptimizerStateError(
                f"flat state {name!r} has shape {tuple(buf.shape)}, expected ({spec.local_numel},) for this rank's slice")
    gfqn = (lambda f: layout.global_fqn(f)) if layout is not None else (lambda f: f)
    acc: dict[str, dict[str, list]] = {}
    tp_replicated: dict[str, bool] = {}
    for seg in spec.segments():
        mapping = layout.map_tensor(seg.fqn, seg.shape) if layout is not None else None
        g = gfqn(seg.fqn)
        # a slice is owned by one DP rank, but TP ranks hold the same slice of a TP-replicated param
        tp_replicated[g] = mapping is None or _is_whole(mapping, seg.shape)
        n = seg.param_end - seg.param_start
        for name, buf in flat_state.items():
            gname = f"{key}.state.{g}.{name}"
            out = acc.setdefault(g, {}).setdefault(name, [])
            sub = buf[seg.local_offset: seg.local_offset + n]
            for box, view in flat_views(sub, seg.shape, seg.param_start, seg.param_end):
                if mapping is None:
                    out.append(Piece(gname, seg.shape, box.offsets, view))
                    continue
                for pm in mapping.pieces:
                    lo = [max(a, b) for a, b in zip(box.offsets, pm.local_offsets)]
                    hi = [min(a + s, b + t) for a, s, b, t in zip(box.offsets, box.sizes, pm.local_offsets, pm.sizes)]
                    if any(l >= h for l, h in zip(lo, hi)):
                        continue
                    v = view[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, box.offsets))]
                    goff = tuple(go + l - lo_ for go, l, lo_ in zip(pm.global_offsets, lo, pm.local_offsets))
                    out.append(Piece(gname, tuple(mapping.global_shape), goff, v))
    result: dict[str, dict[str, object]] = {}
    for p in spec.params:
        g = gfqn(p.fqn)
        entry: dict[str, object] = {}
        for name, lst in acc.get(g, {}).items():
            entry[name] = GlobalPieces(lst, replicated=tp_replicated[g] and layout is not None and layout.tp_size > 1)
        for name, t in (scalar_state or {}).items():
            entry[name] = GlobalPieces([Piece(f"{key}.state.{g}.{name}", tuple(t.shape), (0,) * t.dim(), t)],
                                       replicated=True)
        if entry:
            result[g] = entry
    return result


def optimizer_state(model: torch.nn.Module, optimizer: object, layout: ParallelLayout | None = None, *,
                    key: str = "optim", init_lazy: bool = True, process_group: object | None = None,
                    no_dist: bool = False) -> OptimizerState:
    """Wrap ``(model, optimizer)`` into a DCP ``Stateful`` keyed by parameter FQNs.

    Put it in the state dict given to ``dcp.save``/``dcp.load`` under ``key``::

        state = {"model": model_state, "optim": dcp_ext.optimizer_state(model, opt, layout)}

    ``optimizer`` is a ``torch.optim.Optimizer`` (Adam, AdamW, SGD, ...: per-parameter state
    tensors of the parameter's shape or scalars) or a flat-buffer (ZeRO-style) optimizer: one
    with ``flat_spec`` (a :class:`FlatBufferSpec`), ``flat_state`` (name -> this rank's 1-D
    slice buffer), ``scalar_state`` (name -> tensor), ``param_groups`` and optionally
    ``after_load()`` (``examples/zero_adam.py`` is a small one). With ``layout`` use
    ``ReshardSavePlanner/ReshardLoadPlanner``.
    """
    return OptimizerState(model, optimizer, layout, key=key, init_lazy=init_lazy, process_group=process_group,
                          no_dist=no_dist)


def __getattr__(name: str) -> object:
    if name == "ZeroAdam":
        raise AttributeError(ZEROADAM_MOVED)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: why ``dcp_ext.ZeroAdam`` / ``dcp_ext.optim.ZeroAdam`` is gone, and where it went
ZEROADAM_MOVED = ("ZeroAdam is no longer part of dcp_ext: it was a reference optimizer kept simple rather than "
                  "fast; copy examples/zero_adam.py from the dcp-ext repository. dcp_ext.optimizer_state "
                  "checkpoints any flat-buffer optimizer with flat_spec, flat_state, scalar_state and "
                  "param_groups (docs/optimizer.md)")
