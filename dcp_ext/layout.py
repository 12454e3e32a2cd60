"""Parallel layouts as data: map plain (Megatron-style) local shards to chunks of global tensors.

A model trained with tensor parallelism (TP) and pipeline parallelism (PP) holds *plain local
tensors*: the meaning of ``layers.0.attn.qkv.weight`` on a rank depends on its TP rank (which
slice), on fused layouts (QKV, gate/up: the local tensor is the concatenation of the rank's slice
of every fused part) and on its pipeline stage (local layer 0 of stage 1 is global layer 2).

This module describes that with two small dataclasses and pure functions, with no process group:

* :class:`ShardSpec` - how one tensor is split across TP ranks (``dim`` and optional fused
  ``segments``, the *global* sizes of the fused parts along ``dim``).
* :class:`ParallelLayout` - one rank's TP/PP/DP coordinates, FQN glob ``rules`` -> spec, and the
  layer renumbering of its pipeline stage (``layer_offset`` or explicit ``stage_layers``).
* :meth:`ParallelLayout.map_tensor` -> :class:`TensorMapping`: the global FQN, the global shape
  and the rectangular boxes (:class:`PieceMap`) that a local tensor covers. Every box is an
  ordinary DCP chunk of the global tensor, so stock DCP overlap logic reshards between layouts.

:class:`GlobalPieces` / :class:`Piece` are state-dict *values* for data that is already mapped
(e.g. optimizer states or ZeRO flat-buffer slices): the resharding planners in
:mod:`dcp_ext.planner` save each piece as a chunk and fill each piece's view on load.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

__all__ = [
    "GlobalPieces",
    "LayoutError",
    "ParallelLayout",
    "Piece",
    "PieceMap",
    "ShardSpec",
    "TensorMapping",
    "compose_global",
    "local_box",
]

from .errors import LayoutError

_REPLICATED = object()  # sentinel: "use spec_for(fqn)"


@dataclass(frozen=True)
class ShardSpec:
    """How a tensor is split across TP ranks.

    ``dim``: the split dimension (negative values count from the end, like PyTorch).
    ``segments``: the *global* sizes of fused parts along ``dim`` (e.g. GQA QKV:
    ``(n_heads*hd, n_kv*hd, n_kv*hd)``; SwiGLU gate/up: ``(ffn, ffn)``). Each part is split evenly
    across TP ranks and a rank's local tensor is the concatenation of its slice of every part.
    ``None`` means one part: the rank holds the ``tp_rank``-th contiguous block.
    Vocab-parallel embeddings are ``ShardSpec(dim=0)``; column-parallel linears ``ShardSpec(0)``,
    row-parallel linears ``ShardSpec(1)`` (PyTorch ``[out, in]`` weights).
    """

    dim: int
    segments: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise LayoutError(f"ShardSpec.dim must be an int, got {self.dim!r}")
        if self.segments is not None:
            segs = tuple(self.segments)
            if not segs:
                raise LayoutError("ShardSpec.segments must not be empty (use None for one part)")
            for s in segs:
                if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                    raise LayoutError(
                        f"ShardSpec.segments must be positive ints (global sizes of the fused parts), "
                        f"got {segs!r}"
                    )
            object.__setattr__(self, "segments", segs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (used to record layouts in checkpoints)."""
        return {"dim": self.dim, "segments": list(self.segments) if self.segments else None}


@dataclass(frozen=True)
class PieceMap:
    """One rectangular box of a local tensor and where it lives in the global tensor."""

    local_offsets: tuple[int, ...]
    global_offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorMapping:
    """Where a local tensor lives globally: FQN, global shape and disjoint boxes covering it."""

    global_fqn: str
    global_shape: tuple[int, ...]
    pieces: tuple[PieceMap, ...]

    @property
    def is_whole(self) -> bool:
        """True when the local tensor is exactly the global tensor (replicated)."""
        return (len(self.pieces) == 1 and self.pieces[0].sizes == self.global_shape
                and not any(self.pieces[0].global_offsets))


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise LayoutError(f"ParallelLayout.{name} must be an int >= {lo}, got {value!r}")


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place in a TP x PP x DP layout plus the rules that give tensors their meaning.

    ``rules`` maps FQN glob patterns (:mod:`fnmatch`, tried in order against the local FQN, then
    the global one) to :class:`ShardSpec`; unmatched tensors are replicated across TP.
    ``layer_pattern`` is a regex whose first group is the layer index inside an FQN; a stage's
    local layer ``i`` is global layer ``stage_layers[i]`` when ``stage_layers`` is given (uneven
    pipeline splits) and ``i + layer_offset`` otherwise. DP replicas hold identical data.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    rules: Mapping[str, ShardSpec] = field(default_factory=dict)
    layer_pattern: str = r"layers\.(\d+)"
    layer_offset: int = 0
    stage_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size", "dp_size"):
            _check_int(name, getattr(self, name), 1)
        for name, size in (("tp_rank", "tp_size"), ("pp_rank", "pp_size"), ("dp_rank", "dp_size")):
            _check_int(name, getattr(self, name), 0)
            if getattr(self, name) >= getattr(self, size):
                raise LayoutError(
                    f"ParallelLayout.{name}={getattr(self, name)} is out of range for "
                    f"{size}={getattr(self, size)} (valid: 0..{getattr(self, size) - 1})"
                )
        _check_int("layer_offset", self.layer_offset, 0)
        if not isinstance(self.rules, Mapping):
            raise LayoutError(f"ParallelLayout.rules must be a mapping glob -> ShardSpec, got {type(self.rules)}")
        for pat, spec in self.rules.items():
            if not isinstance(pat, str):
                raise LayoutError(f"ParallelLayout.rules keys must be FQN glob strings, got {pat!r}")
            if not isinstance(spec, ShardSpec):
                raise LayoutError(f"ParallelLayout.rules[{pat!r}] must be a ShardSpec, got {spec!r}")
        object.__setattr__(self, "rules", dict(self.rules))
        try:
            rx = re.compile(self.layer_pattern)
        except re.error as e:
            raise LayoutError(f"ParallelLayout.layer_pattern {self.layer_pattern!r} is not a valid regex: {e}") from e
        if rx.groups < 1:
            raise LayoutError(
                f"ParallelLayout.layer_pattern {self.layer_pattern!r} needs a group capturing the layer "
                f"index, e.g. r'layers\\.(\\d+)'"
            )
        object.__setattr__(self, "_rx", rx)
        if self.stage_layers is not None:
            layers = tuple(self.stage_layers)
            for g in layers:
                if not isinstance(g, int) or isinstance(g, bool) or g < 0:
                    raise LayoutError(f"ParallelLayout.stage_layers must be non-negative ints, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise LayoutError(f"ParallelLayout.stage_layers has duplicate layer ids: {layers!r}")
            if self.layer_offset:
                raise LayoutError("give either ParallelLayout.stage_layers or layer_offset, not both")
            object.__setattr__(self, "stage_layers", layers)

    def __hash__(self) -> int:  # rules is a dict: hash its items
        return hash((self.tp_rank, self.tp_size, self.pp_rank, self.pp_size, self.dp_rank, self.dp_size,
                     tuple(self.rules.items()), self.layer_pattern, self.layer_offset, self.stage_layers))

    # ---- FQNs ---------------------------------------------------------------------------------
    def spec_for(self, fqn: str) -> ShardSpec | None:
        """The first rule whose glob matches ``fqn`` (``None``: replicated across TP)."""
        for pat, spec in self.rules.items():
            if fnmatch.fnmatchcase(fqn, pat):
                return spec
        return None

    def _layer_match(self, fqn: str) -> re.Match[str] | None:
        return self._rx.search(fqn)  # type: ignore[attr-defined]

    def global_layer(self, local_layer: int, fqn: str = "") -> int:
        """Global id of this stage's local layer ``local_layer``."""
        if self.stage_layers is not None:
            if local_layer >= len(self.stage_layers):
                raise LayoutError(
                    f"{fqn or 'tensor'}: local layer {local_layer} does not exist on PP stage {self.pp_rank}, "
                    f"whose stage_layers are {list(self.stage_layers)} ({len(self.stage_layers)} layers)"
                )
            return self.stage_layers[local_layer]
        return local_layer + self.layer_offset

    def global_fqn(self, local_fqn: str) -> str:
        """Rename a local FQN to its global name (PP layer renumbering; identity without a layer)."""
        m = self._layer_match(local_fqn)
        if m is None:
            return local_fqn
        g = self.global_layer(int(m.group(1)), local_fqn)
        return local_fqn[: m.start(1)] + str(g) + local_fqn[m.end(1):]

    def local_fqn(self, global_fqn: str) -> str | None:
        """Inverse of :meth:`global_fqn`; ``None`` when the layer is not on this stage.

        With ``layer_offset`` only, the stage's last layer is unknown, so every layer id
        ``>= layer_offset`` maps to a local name.
        """
        m = self._layer_match(global_fqn)
        if m is None:
            return global_fqn
        g = int(m.group(1))
        if self.stage_layers is not None:
            if g not in self.stage_layers:
                return None
            i = self.stage_layers.index(g)
        else:
            i = g - self.layer_offset
            if i < 0:
                return None
        return global_fqn[: m.start(1)] + str(i) + global_fqn[m.end(1):]

    # ---- tensors ------------------------------------------------------------------------------
    def map_tensor(self, local_fqn: str, local_shape: Sequence[int],
                   spec: ShardSpec | None | Any = _REPLICATED) -> TensorMapping:
        """Global FQN, global shape and boxes of a local tensor.

        ``spec`` defaults to :meth:`spec_for` (local FQN first, then the global FQN); ``None``
        means replicated. 0-d tensors are always replicated. Raises :class:`LayoutError` when the
        local shape cannot come from the spec (segment not divisible by ``tp_size``, fused local
        size not matching the segments, ``dim`` out of range).
        """
        gfqn = self.global_fqn(local_fqn)
        shape = tuple(int(s) for s in local_shape)
        if spec is _REPLICATED:
            spec = self.spec_for(local_fqn)
            if spec is None and gfqn != local_fqn:
                spec = self.spec_for(gfqn)
        if spec is not None and not isinstance(spec, ShardSpec):
            raise LayoutError(f"{local_fqn}: spec must be a ShardSpec or None, got {spec!r}")
        zero = (0,) * len(shape)
        if spec is None or len(shape) == 0:
            return TensorMapping(gfqn, shape, (PieceMap(zero, zero, shape),))
        return TensorMapping(gfqn, *_shard_boxes(local_fqn, shape, spec, self.tp_rank, self.tp_size))

    def local_shape(self, local_fqn: str, global_shape: Sequence[int],
                    spec: ShardSpec | None | Any = _REPLICATED) -> tuple[int, ...]:
        """The local shape this rank holds for a global tensor of ``global_shape``."""
        shape = tuple(int(s) for s in global_shape)
        if spec is _REPLICATED:
            spec = self.spec_for(local_fqn)
            if spec is None:
                spec = self.spec_for(self.global_fqn(local_fqn))
        if spec is None or len(shape) == 0:
            return shape
        dim = _shard_dim(local_fqn, shape, spec)
        if shape[dim] % self.tp_size:
            raise LayoutError(
                f"{local_fqn}: global size {shape[dim]} of dim {dim} is not divisible by tp_size={self.tp_size}"
            )
        out = list(shape)
        out[dim] //= self.tp_size
        return tuple(out)

    def shard(self, local_fqn: str, global_tensor: torch.Tensor,
              spec: ShardSpec | None | Any = _REPLICATED) -> torch.Tensor:
        """This rank's local tensor (a new contiguous tensor) cut from a full ``global_tensor``."""
        lshape = self.local_shape(local_fqn, global_tensor.shape, spec)
        mapping = self.map_tensor(local_fqn, lshape, spec)
        if mapping.global_shape != tuple(global_tensor.shape):
            raise LayoutError(
                f"{local_fqn}: global tensor shape {list(global_tensor.shape)} does not match the layout's "
                f"{list(mapping.global_shape)}"
            )
        out = torch.empty(lshape, dtype=global_tensor.dtype)
        for p in mapping.pieces:
            local_box(out, p).copy_(local_box(global_tensor, PieceMap(p.global_offsets, p.global_offsets, p.sizes)))
        return out

    # ---- description --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (recorded in checkpoints so errors can name the saving layout)."""
        return {
            "tp_rank": self.tp_rank, "tp_size": self.tp_size, "pp_rank": self.pp_rank,
            "pp_size": self.pp_size, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "rules": {k: v.to_dict() for k, v in self.rules.items()},
            "layer_pattern": self.layer_pattern, "layer_offset": self.layer_offset,
            "stage_layers": list(self.stage_layers) if self.stage_layers is not None else None,
        }

    def describe(self) -> str:
        """Short human description, e.g. ``TPxPPxDP=2x2x1 (tp 0, pp 1 [layers 2,3], dp 0)``."""
        if self.stage_layers is not None:
            stage = f"layers {','.join(map(str, self.stage_layers))}"
        else:
            stage = f"layer_offset {self.layer_offset}"
        return (f"TPxPPxDP={self.tp_size}x{self.pp_size}x{self.dp_size} "
                f"(tp {self.tp_rank}, pp {self.pp_rank} [{stage}], dp {self.dp_rank})")


def _shard_dim(fqn: str, shape: tuple[int, ...], spec: ShardSpec) -> int:
    """``spec.dim`` as a non-negative dimension of ``shape``; LayoutError if out of range."""
    ndim = len(shape)
    dim = spec.dim + ndim if spec.dim < 0 else spec.dim
    if not 0 <= dim < ndim:
        raise LayoutError(
            f"{fqn}: ShardSpec.dim={spec.dim} is out of range for a {ndim}-d tensor of shape {list(shape)} "
            f"(valid: {-ndim}..{ndim - 1})"
        )
    return dim


def _shard_boxes(fqn: str, shape: tuple[int, ...], spec: ShardSpec, tp_rank: int,
                 tp_size: int) -> tuple[tuple[int, ...], tuple[PieceMap, ...]]:
    dim = _shard_dim(fqn, shape, spec)
    local_len = shape[dim]
    segments = spec.segments if spec.segments is not None else (local_len * tp_size,)
    for s in segments:
        if s % tp_size:
            raise LayoutError(
                f"{fqn}: fused segment of global size {s} (segments {list(segments)}) is not divisible "
                f"by tp_size={tp_size}"
            )
    if sum(segments) != local_len * tp_size:
        raise LayoutError(
            f"{fqn}: local shape {list(shape)} does not match ShardSpec(dim={spec.dim}, "
            f"segments={list(segments)}) at tp_size={tp_size}: dim {dim} must be "
            f"sum(segments)/tp_size = {sum(segments) // tp_size}, got {local_len}"
        )
    gshape = list(shape)
    gshape[dim] = sum(segments)
    pieces = []
    local_pos = 0
    global_start = 0
    for s in segments:
        part = s // tp_size
        lo = [0] * len(shape)
        go = [0] * len(shape)
        sz = list(shape)
        lo[dim] = local_pos
        go[dim] = global_start + tp_rank * part
        sz[dim] = part
        pieces.append(PieceMap(tuple(lo), tuple(go), tuple(sz)))
        local_pos += part
        global_start += s
    return tuple(gshape), tuple(pieces)


def local_box(tensor: torch.Tensor, piece: PieceMap) -> torch.Tensor:
    """The view of ``tensor`` that ``piece`` describes (no copy)."""
    view = tensor
    for d, (o, s) in enumerate(zip(piece.local_offsets, piece.sizes)):
        if o != 0 or s != tensor.shape[d]:
            view = view.narrow(d, o, s)
    return view


def compose_global(mapping_and_tensors: Sequence[tuple[TensorMapping, torch.Tensor]]) -> torch.Tensor:
    """Assemble a global tensor from local tensors and their mappings (for tests and tools).

    Raises :class:`LayoutError` if the mappings disagree on the global tensor or leave holes.
    """
    if not mapping_and_tensors:
        raise LayoutError("compose_global needs at least one (mapping, tensor)")
    first = mapping_and_tensors[0][0]
    out = torch.empty(first.global_shape, dtype=mapping_and_tensors[0][1].dtype)
    covered = torch.zeros(first.global_shape, dtype=torch.bool)
    for m, t in mapping_and_tensors:
        if (m.global_fqn, m.global_shape) != (first.global_fqn, first.global_shape):
            raise LayoutError(
                f"compose_global: mappings disagree: {m.global_fqn}{list(m.global_shape)} vs "
                f"{first.global_fqn}{list(first.global_shape)}"
            )
        for p in m.pieces:
            gp = PieceMap(p.global_offsets, p.global_offsets, p.sizes)
            local_box(out, gp).copy_(local_box(t, p))
            local_box(covered, gp).fill_(True)
    if not bool(covered.all()):
        raise LayoutError(f"compose_global: {first.global_fqn} is not fully covered by the given shards")
    return out


@dataclass
class Piece:
    """One box of a global tensor backed by a local view (``view.shape`` == the box sizes)."""

    global_fqn: str
    global_shape: tuple[int, ...]
    global_offsets: tuple[int, ...]
    view: torch.Tensor

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(s) for s in self.global_shape)
        self.global_offsets = tuple(int(o) for o in self.global_offsets)
        if not isinstance(self.view, torch.Tensor):
            raise LayoutError(f"Piece {self.global_fqn}: view must be a torch.Tensor, got {type(self.view)}")
        sizes = tuple(self.view.shape)
        if len(self.global_offsets) != len(self.global_shape) or len(sizes) != len(self.global_shape):
            raise LayoutError(
                f"Piece {self.global_fqn}: global_shape {list(self.global_shape)}, global_offsets "
                f"{list(self.global_offsets)} and view shape {list(sizes)} must have the same rank"
            )
        for o, s, g in zip(self.global_offsets, sizes, self.global_shape):
            if o < 0 or o + s > g:
                raise LayoutError(
                    f"Piece {self.global_fqn}: box offsets {list(self.global_offsets)} sizes {list(sizes)} "
                    f"lies outside the global shape {list(self.global_shape)}"
                )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.view.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.view.shape) * self.view.element_size()


@dataclass
class GlobalPieces:
    """Explicit pieces of one or more global tensors, each backed by a local tensor view.

    Save: every piece becomes a chunk ``(global_fqn, offsets=global_offsets, sizes)``.
    Load: every piece's ``view`` is filled in place from the overlapping saved chunks.
    ``replicated=True`` declares the same pieces may be held (identically) by several ranks;
    the save planner then writes each once, balanced by bytes.
    """

    pieces: list[Piece]
    replicated: bool = False

    def __post_init__(self) -> None:
        for p in self.pieces:
            if not isinstance(p, Piece):
                raise LayoutError(f"GlobalPieces.pieces must hold Piece objects, got {type(p)}")
