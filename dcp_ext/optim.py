"""Optimizer state for DCP, keyed by parameter FQN: per-parameter state and ZeRO flat-buffer slices.

Torch optimizers key their state by parameter *position*, which breaks as soon as the model
layout changes. This module presents optimizer state keyed by the parameters' (global) FQNs:

* :func:`optimizer_state` wraps ``(model, optimizer)`` into a DCP ``Stateful`` whose state is
  ``{"state": {fqn: {"exp_avg": t, "exp_avg_sq": t, "step": t, ...}}, "param_groups": [...]}``.
  With a :class:`~dcp_ext.layout.ParallelLayout`, per-parameter states of TP-sharded or
  pipeline-staged parameters become :class:`~dcp_ext.layout.GlobalPieces` of the *global*
  parameter, so they reshard exactly like the weights with the Reshard planners.
* :func:`flat_state_pieces` presents a flat-buffer (ZeRO-1/2) optimizer's slices, described by
  a :class:`FlatBufferSpec` and cut into boxes by :mod:`dcp_ext.flat_buffer` (re-exported
  here), as pieces of the global parameters: a ZeRO slice is saved as ordinary DCP chunks and
  any other DP size (and TP/PP layout) fills its slice from the overlapping chunks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .errors import OptimizerStateError
from .flat_buffer import (  # re-exported: dcp_ext.optim is where these were first published
    Box,
    FlatBufferSpec,
    FlatParam,
    FlatSegment,
    box_flat_range,
    flat_views,
    max_boxes,
    pack_flat,
    range_to_boxes,
    unpack_flat,
)

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
