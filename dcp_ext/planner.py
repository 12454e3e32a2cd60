"""Resharding planners: save plain (Megatron-style) shards as chunks of global tensors, load them
back at any other TP / PP / DP layout or world size.

Both planners subclass DCP's defaults and only change *which chunks* are written and read:

* :class:`ReshardSavePlanner` maps every plain local tensor with
  :meth:`ParallelLayout.map_tensor <dcp_ext.layout.ParallelLayout.map_tensor>` to one or more
  boxes of a global tensor stored under its global FQN (fused tensors give several boxes), passes
  DTensors through (only renaming PP layers), saves :class:`~dcp_ext.layout.GlobalPieces` piece by
  piece and other objects as stock bytes. Data held by several ranks (DP replicas, TP-replicated
  norms, bytes) is written once, balanced by bytes over the ranks that hold it. The global plan
  asserts that ``(FQN, chunk offsets)`` are unique - stock dedup would silently drop a colliding
  chunk - and records the saving layout in ``Metadata.planner_data``.
* :class:`ReshardLoadPlanner` maps the target's local tensors the same way and lets DCP's
  overlap logic (``create_read_items_for_chunk_list``) read the intersecting parts of the saved
  chunks straight into views of the local tensors.

The checkpoint stays standard DCP: stock ``DefaultLoadPlanner`` loads full global tensors from it
and ``format_utils.dcp_to_torch_save`` gives the unsharded model.

Why both planners share this module (about 520 lines): they are the two directions of one mapping
(local tensor -> global FQN, boxes, nested-dict paths, ``GlobalPieces``) and share its helpers;
the coordinator's deduplication of the save plans is its own module, :mod:`dcp_ext.save_dedup`.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _compare_save_plans,
    _create_chunk_list,
    _create_read_item_for_byteio,
    _create_write_item_for_bytesio,
    _create_write_items,
    create_read_items_for_chunk_list,
)
from torch.distributed.tensor import DTensor

from .errors import LayoutError, ReshardError
from .layout import GlobalPieces, ParallelLayout, local_box
from .save_dedup import LAYOUT_KEY, MAX_LISTED, dedup_by_bytes, describe_layouts, layout_info, plan_fingerprint
from .torch_compat import validate_global_plan

__all__ = ["LAYOUT_KEY", "ReshardLoadPlanner", "ReshardReport", "ReshardSavePlanner", "saved_layout"]

logger = logging.getLogger(__name__)



def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns exactly its storage, else a compact copy.

    ``torch.save`` of a view writes the whole underlying storage; a narrowed shard of a fused
    tensor (or a box of a flat buffer) must be copied so each chunk stores only its own bytes.
    """
    if (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _layers_of(fqns: Any, layout: ParallelLayout) -> list[int]:
    rx = re.compile(layout.layer_pattern)
    out = set()
    for f in fqns:
        m = rx.search(f)
        if m:
            out.add(int(m.group(1)))
    return sorted(out)


def _global_path(local_path: tuple, local_fqn: str, global_fqn: str, layout: ParallelLayout) -> tuple:
    """Nested-dict path of a renamed FQN (so ``dcp_to_torch_save`` rebuilds the user's nesting)."""
    if global_fqn == local_fqn:
        return local_path
    m = re.compile(layout.layer_pattern).search(local_fqn)
    if m is None or ".".join(map(str, local_path)) != local_fqn:
        return (global_fqn,)
    pos = 0
    out = list(local_path)
    for i, comp in enumerate(local_path):
        s = str(comp)
        if pos <= m.start(1) and m.end(1) <= pos + len(s):
            delta = len(global_fqn) - len(local_fqn)
            new_s = global_fqn[pos: pos + len(s) + delta]
            out[i] = int(new_s) if isinstance(comp, int) else new_s
            return tuple(out)
        pos += len(s) + 1
    return (global_fqn,)


def _pieces_path(local_path: tuple, global_fqn: str) -> tuple:
    prefix = ".".join(map(str, local_path[:-1]))
    if prefix and global_fqn.startswith(prefix + "."):
        return tuple(local_path[:-1]) + (global_fqn[len(prefix) + 1:],)
    return (global_fqn,)


class ReshardSavePlanner(DefaultSavePlanner):
    """Save plain local shards described by ``layout`` as chunks of global tensors.

    Accepts (anywhere in a nested state dict) plain tensors (mapped with ``layout.map_tensor``),
    DTensors (stock chunks; PP layer names renumbered), :class:`~dcp_ext.layout.GlobalPieces` and
    other objects (saved as bytes). Replicated data is written once, balanced by bytes over the
    ranks holding it (largest first to the least-loaded rank; ties go to the lower rank).

    ``enable_plan_caching=True``: stock DCP's plan caching (as ``DefaultSavePlanner``'s). A rank
    whose local plan (items *and* planner data: layout, value paths) equals its last one sends an
    empty plan; when no rank's plan changed, the coordinator reuses the cached global plan and
    metadata, so a repeat save with the same structure skips the dedup, the tiling check and
    almost all of the gather/scatter. A changed plan on any rank re-plans. Use one planner
    *class* per kind of state dict within a process (the cache is keyed by class, as stock's).
    """

    def __init__(self, layout: ParallelLayout, *, flatten_state_dict: bool = True,
                 enable_plan_caching: bool = False) -> None:
        if not isinstance(layout, ParallelLayout):
            raise TypeError(f"ReshardSavePlanner needs a dcp_ext.ParallelLayout, got {type(layout).__name__}")
        super().__init__(flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=True,
                         enable_plan_caching=enable_plan_caching)
        self.layout = layout
        self._sources: dict[tuple[str, tuple | None], Any] = {}

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: Any = None,
                       is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self._sources = {}

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        anywhere: list[int] = []
        exclusive: list[int] = []
        paths: dict[str, tuple] = {}
        lay = self.layout
        for fqn, obj in self.state_dict.items():
            path = tuple(self.mappings.get(fqn, (fqn,))) if self.flatten_state_dict else (fqn,)
            if isinstance(obj, DTensor):
                if obj.device_mesh.get_coordinate() is None:
                    continue
                g = lay.global_fqn(fqn)
                for wi in _create_write_items(g, obj):
                    self._add(items, wi, obj.to_local())
                paths[g] = _global_path(path, fqn, g, lay)
            elif isinstance(obj, GlobalPieces):
                for p in obj.pieces:
                    wi = _tensor_item(p.global_fqn, p.global_shape, p.global_offsets, p.view)
                    (anywhere if obj.replicated else exclusive).append(len(items))
                    self._add(items, wi, p.view)
                    paths.setdefault(p.global_fqn, _pieces_path(path, p.global_fqn))
            elif isinstance(obj, torch.Tensor):
                m = lay.map_tensor(fqn, obj.shape)
                for pm in m.pieces:
                    view = local_box(obj, pm)
                    self._add(items, _tensor_item(m.global_fqn, m.global_shape, pm.global_offsets, view,
                                                  whole=m.is_whole), view)
                paths[m.global_fqn] = _global_path(path, fqn, m.global_fqn, lay)
            elif type(obj).__name__ == "ShardedTensor":
                raise ReshardError(f"{fqn}: ShardedTensor is not supported by ReshardSavePlanner; use DTensor "
                                   f"or a plain local tensor with a ShardSpec rule")
            else:
                g = lay.global_fqn(fqn)
                anywhere.append(len(items))
                self._add(items, _create_write_item_for_bytesio(g, obj), obj)
                paths[g] = _global_path(path, fqn, g, lay)
        info = {
            "layout": lay.to_dict(),
            "layers": _layers_of({it.index.fqn for it in items}, lay),
            "anywhere": anywhere,
            "exclusive": exclusive,
            "fingerprint": plan_fingerprint(lay.pp_rank, items, anywhere, exclusive),
        }
        planner_data = dict(paths)
        planner_data[LAYOUT_KEY] = (json.dumps(info),)
        self.plan = SavePlan(items, planner_data=planner_data)
        if self._enable_plan_caching:
            cached = SavePlanner._cached_save_plan.get(self._cached_plans_key)
            if cached is not None and cached.planner_data == planner_data and _compare_save_plans(self.plan, cached):
                logger.debug("ReshardSavePlanner: local plan unchanged, sending an empty one")
                return SavePlan([], usable=False)
            # promoted to the cache by finish_plan, once the global plan succeeded (as stock does)
            self._pending_local_plan = self.plan
        return self.plan

    def _add(self, items: list[WriteItem], wi: WriteItem, source: Any) -> None:
        key = (wi.index.fqn, None if wi.index.offset is None else tuple(wi.index.offset))
        if key in self._sources:
            raise ReshardError(
                f"ReshardSavePlanner: this rank ({self.layout.describe()}) maps two state-dict values to the "
                f"same chunk {key[0]} at offsets {list(key[1] or [])}; check the PP layer renumbering "
                f"(layer_pattern/layer_offset/stage_layers) and GlobalPieces names"
            )
        self._sources[key] = source
        items.append(wi)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # see dedup_by_bytes: GC passes over millions of plan objects cost more than the work
        try:
            # stock's create_global_plan: with plan caching it reuses or merges the cached plans
            # and returns only the changed ones; it builds a plan with _create_global_plan (ours)
            return super().create_global_plan(all_plans)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return self._create_reshard_global_plan(all_plans)

    def _create_reshard_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        t0 = time.perf_counter()
        infos = [layout_info(p) for p in all_plans]
        deduped = dedup_by_bytes(all_plans, infos)
        global_plan, metadata = create_default_global_save_plan(deduped)
        merged: dict[str, Any] = {}
        for p in all_plans:
            if isinstance(p.planner_data, dict):
                merged.update(p.planner_data)
        merged[LAYOUT_KEY] = (json.dumps({"format": 1, "description": describe_layouts(infos),
                                          "ranks": [i["layout"] if i else None for i in infos]}),)
        metadata = dataclasses.replace(metadata, planner_data=merged)
        errors = validate_global_plan(global_plan, metadata)
        if len(global_plan) == 1:  # stock checks coverage only with several ranks (2.7: always)
            for k, v in metadata.state_dict_metadata.items():
                if isinstance(v, TensorStorageMetadata) and len(v.size):
                    vol = sum(math.prod(c.sizes) for c in v.chunks)
                    msg = f"key:{k} invalid fill tensor-volume: {math.prod(v.size)} chunks-volume: {vol}"
                    if vol != math.prod(v.size) and msg not in errors:  # torch 2.7 checks it too
                        errors.append(msg)
        if errors:
            listed = "; ".join(errors[:10])
            raise ReshardError(
                f"ReshardSavePlanner: the chunks of the ranks' layouts do not tile the global tensors "
                f"({len(errors)} problems; saving layout {describe_layouts(infos)}): {listed}"
            )
        self.global_plan = global_plan
        self.metadata = metadata
        logger.info("ReshardSavePlanner: global plan for %d ranks: %d write items -> %d chunks in %.2f s (%s)",
                    len(all_plans), sum(len(p.items) for p in all_plans), sum(len(p.items) for p in global_plan),
                    time.perf_counter() - t0, describe_layouts(infos))
        return global_plan, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)  # with plan caching: the cached plan if unchanged
        pending = self.__dict__.pop("_pending_local_plan", None)
        if pending is not None:  # torch 2.7's finish_plan does not promote it (2.13's pops it itself)
            SavePlanner._cached_save_plan[self._cached_plans_key] = pending
        if plan is not new_plan and new_plan.storage_data is not None:
            # the cached plan carries the storage data of the save that cached it: the writer's
            # data for *this* save (e.g. its save id) came with the empty plan
            plan = dataclasses.replace(plan, storage_data=new_plan.storage_data)
            self.plan = plan
        return plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = (write_item.index.fqn, None if write_item.index.offset is None else tuple(write_item.index.offset))
        obj = self._sources[key]
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save(obj, buf)
            return buf
        return _compact(obj.detach())


def _tensor_item(gfqn: str, gshape: tuple[int, ...], goffsets: tuple[int, ...], view: torch.Tensor,
                 whole: bool = False) -> WriteItem:
    offsets = torch.Size(goffsets)
    return WriteItem(
        index=MetadataIndex(gfqn, offsets),
        type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(view.shape)),
            properties=TensorProperties.create_from_tensor(view),
            size=torch.Size(gshape),
        ),
    )


# ---------------------------------------------------------------------------------------- load


@dataclass
class ReshardReport:
    """What a :class:`ReshardLoadPlanner` could not load (empty lists: everything matched)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    saved_layout: str = ""
    target_layout: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches)

    def format(self) -> str:
        """Multi-line human summary naming the saved and the target layout."""
        lines = [f"saved layout: {self.saved_layout}", f"target layout: {self.target_layout}"]
        for title, xs in (("missing keys (in the target, not in the checkpoint)", self.missing_keys),
                          ("unexpected keys (in the checkpoint, not loaded by any rank)", self.unexpected_keys),
                          ("shape mismatches", self.shape_mismatches)):
            if xs:
                more = f" ... and {len(xs) - MAX_LISTED} more" if len(xs) > MAX_LISTED else ""
                lines.append(f"{len(xs)} {title}: " + ", ".join(xs[:MAX_LISTED]) + more)
        return "\n".join(lines)


def saved_layout(metadata: Metadata) -> str:
    """The saving layout recorded by :class:`ReshardSavePlanner` in a checkpoint's metadata."""
    pd = metadata.planner_data
    if isinstance(pd, dict) and LAYOUT_KEY in pd:
        try:
            return json.loads(pd[LAYOUT_KEY][0])["description"]
        except (ValueError, KeyError, TypeError, IndexError):
            return "unreadable layout record"
    return "unknown (not written by ReshardSavePlanner)"


_PLACEHOLDER = "\x00dcp_ext.GlobalPieces#"


def _swap_pieces(obj: Any, hidden: dict[str, GlobalPieces]) -> None:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        if isinstance(v, GlobalPieces):
            token = f"{_PLACEHOLDER}{len(hidden)}"
            hidden[token] = v
            obj[k] = token
        elif isinstance(v, (dict, list)):
            _swap_pieces(v, hidden)


def _unswap_pieces(obj: Any, hidden: dict[str, GlobalPieces]) -> None:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        if isinstance(v, str) and v in hidden:
            obj[k] = hidden[v]
        elif isinstance(v, (dict, list)):
            _unswap_pieces(v, hidden)


class ReshardLoadPlanner(DefaultLoadPlanner):
    """Fill plain local shards (and GlobalPieces views, DTensors) of ``layout`` from any saved layout.

    ``strict=True``: missing keys, keys no rank loads and shape mismatches raise one
    :class:`~dcp_ext.errors.ReshardError` naming the saved and the target layout (raised on the
    coordinator; DCP re-raises it on every rank inside a ``CheckpointException``).
    ``strict=False``: whatever matches is loaded; the rest is logged and left in :attr:`report`.
    """

    def __init__(self, layout: ParallelLayout, strict: bool = True, *, flatten_state_dict: bool = True) -> None:
        if not isinstance(layout, ParallelLayout):
            raise TypeError(f"ReshardLoadPlanner needs a dcp_ext.ParallelLayout, got {type(layout).__name__}")
        super().__init__(flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=True,
                         allow_partial_load=not strict)
        self.layout = layout
        self.strict = strict
        #: set after planning: what did not match (see :class:`ReshardReport`)
        self.report: ReshardReport | None = None
        self._dest: dict[tuple[str, tuple], list[torch.Tensor]] = {}

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # Stock _init_state_dict replaces values it does not know (our GlobalPieces) with None:
        # hide them behind placeholder strings while the stock set-up runs, then put them back.
        hidden: dict[str, GlobalPieces] = {}
        _swap_pieces(state_dict, hidden)
        try:
            super().set_up_planner(state_dict, metadata, is_coordinator)
        finally:
            _unswap_pieces(state_dict, hidden)
        if hidden:
            for k, v in self.state_dict.items():
                if isinstance(v, str) and v in hidden:
                    self.state_dict[k] = hidden[v]

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise ReshardError("ReshardLoadPlanner: no checkpoint metadata was given to the planner")
        md = self.metadata.state_dict_metadata
        lay = self.layout
        self._dest = {}
        requests: list[ReadItem] = []
        missing: list[str] = []
        mismatched: list[str] = []
        claimed: set[str] = set()

        def want(local: str, g: str, gshape: tuple, offsets: tuple, view: torch.Tensor, why: str) -> None:
            claimed.add(g)
            smd = md.get(g)
            if smd is None:
                missing.append(local if g == local else f"{local} (global {g})")
                return
            if not isinstance(smd, TensorStorageMetadata):
                mismatched.append(f"{g}: checkpoint holds a non-tensor object, target holds a tensor")
                return
            if tuple(smd.size) != tuple(gshape):
                mismatched.append(f"{g}: checkpoint global shape {list(smd.size)}, target {why} implies "
                                  f"{list(gshape)}")
                return
            if smd.properties.dtype != view.dtype:
                logger.warning("%s: checkpoint dtype %s loaded into %s", g, smd.properties.dtype, view.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(view.shape))
            reads = create_read_items_for_chunk_list(g, smd, [chunk])
            covered = sum(math.prod(r.lengths) for r in reads)
            if covered != math.prod(view.shape):
                mismatched.append(f"{g}: the checkpoint's chunks cover {covered} of the {math.prod(view.shape)} "
                                  f"elements at offsets {list(offsets)} (incomplete checkpoint)")
                return
            self._dest.setdefault((g, tuple(offsets)), []).append(view)
            requests.extend(reads)

        for fqn, obj in self.state_dict.items():
            if isinstance(obj, DTensor):
                if obj.device_mesh.get_coordinate() is None:
                    continue
                g = lay.global_fqn(fqn)
                for ch in _create_chunk_list(obj):
                    want(fqn, g, tuple(obj.shape), tuple(ch.offsets), obj.to_local(),
                         f"DTensor {list(obj.placements)}")
            elif isinstance(obj, GlobalPieces):
                for p in obj.pieces:
                    want(fqn, p.global_fqn, p.global_shape, p.global_offsets, p.view, "GlobalPieces")
            elif isinstance(obj, torch.Tensor):
                try:
                    m = lay.map_tensor(fqn, obj.shape)
                except LayoutError as e:  # the local tensor cannot come from this layout
                    claimed.add(lay.global_fqn(fqn))
                    mismatched.append(f"{e} (target layout {lay.describe()})")
                    continue
                spec = lay.spec_for(fqn) or lay.spec_for(m.global_fqn)
                why = (f"layout {lay.describe()} (local shape {list(obj.shape)}, {spec})" if spec
                       else f"layout {lay.describe()} (replicated, local shape {list(obj.shape)})")
                for pm in m.pieces:
                    want(fqn, m.global_fqn, m.global_shape, pm.global_offsets, local_box(obj, pm), why)
            else:
                g = lay.global_fqn(fqn)
                claimed.add(g)
                smd = md.get(g)
                if smd is None:
                    missing.append(fqn if g == fqn else f"{fqn} (global {g})")
                elif not isinstance(smd, BytesStorageMetadata):
                    mismatched.append(f"{g}: checkpoint holds a tensor {list(smd.size)}, target holds "
                                      f"{type(obj).__name__}")
                else:
                    requests.append(_create_read_item_for_byteio(
                        dest_index=MetadataIndex(fqn), dest_offset=0,
                        storage_index=MetadataIndex(g), storage_offset=0, length=0))
        info = {"layout": lay.to_dict(), "layers": _layers_of(claimed, lay), "missing": missing,
                "mismatched": mismatched, "claimed": sorted(claimed)}
        return LoadPlan(requests, planner_data={LAYOUT_KEY: (json.dumps(info),)})

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        infos = [layout_info(p) for p in global_plan]
        md = self.metadata.state_dict_metadata if self.metadata is not None else {}
        claimed: set[str] = set()
        missing: list[str] = []
        mismatched: list[str] = []
        for i in infos:
            if i is None:
                continue
            claimed.update(i["claimed"])
            missing.extend(m for m in i["missing"] if m not in missing)
            mismatched.extend(m for m in i["mismatched"] if m not in mismatched)
        unexpected = sorted(k for k in md if k not in claimed)
        report = ReshardReport(missing_keys=missing, unexpected_keys=unexpected, shape_mismatches=mismatched,
                               saved_layout=saved_layout(self.metadata) if self.metadata else "unknown",
                               target_layout=describe_layouts(infos))
        logger.info("ReshardLoadPlanner: %d ranks load %d read items; saved layout %s; target %s",
                    len(global_plan), sum(len(p.items) for p in global_plan), report.saved_layout,
                    report.target_layout)
        if self.strict and not report.ok:
            raise ReshardError("ReshardLoadPlanner (strict): the checkpoint does not match the target layout\n"
                               + report.format())
        return [dataclasses.replace(p, planner_data=report) for p in global_plan]

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        report = new_plan.planner_data
        self.report = report if isinstance(report, ReshardReport) else None
        if self.report is not None and not self.report.ok:
            logger.warning("ReshardLoadPlanner (strict=False) loaded what matched; not loaded:\n%s",
                           self.report.format())
        return new_plan

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dests = self._dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        return narrow_tensor_by_index(dests[0], read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        dests = self._dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for other in dests[1:]:  # the same global box wanted twice on this rank (e.g. tied weights)
            narrow_tensor_by_index(other, read_item.dest_offsets, read_item.lengths).copy_(tensor)
