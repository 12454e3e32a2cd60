"""Compare two checkpoints tensor by tensor (``dcp-ext diff``), streaming both in bounded batches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import parse_size
from ..progress import Progress
from .dcp_source import CheckpointTensors, select_keys

__all__ = ["DiffReport", "ItemDiff", "diff_checkpoints"]

logger = logging.getLogger(__name__)

_SLICE = 4 * 1024 * 1024


@dataclass
class ItemDiff:
    """How one key differs. ``status``: ``equal``, ``values`` (same shape and dtype, values differ
    beyond ``atol``), ``dtype`` (values compared after casting), ``shape``, ``only_a``, ``only_b``,
    ``bytes`` (a non-tensor item whose stored bytes differ)."""

    key: str
    status: str
    #: elements whose difference exceeds ``atol`` (NaN against a number counts)
    count: int = 0
    numel: int = 0
    #: largest absolute difference (``inf`` where a NaN meets a number)
    max_abs: float = 0.0
    detail: str = ""


@dataclass
class DiffReport:
    a: str
    b: str
    atol: float
    items: list[ItemDiff] = field(default_factory=list)

    @property
    def differences(self) -> list[ItemDiff]:
        return [d for d in self.items if d.status != "equal"]

    @property
    def identical(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "atol": self.atol, "identical": self.identical,
                "compared": len(self.items), "differences": [d.__dict__ for d in self.differences]}


def _compare(key: str, x: torch.Tensor, y: torch.Tensor, atol: float) -> ItemDiff:
    status = "equal" if x.dtype == y.dtype else "dtype"
    exact = x.dtype == y.dtype and not x.is_floating_point() and not x.is_complex()
    fx, fy = x.reshape(-1), y.reshape(-1)
    count, worst = 0, 0.0
    for i in range(0, fx.numel(), _SLICE):
        a, b = fx[i:i + _SLICE], fy[i:i + _SLICE]
        if exact:
            ne = a != b
            if bool(ne.any()):
                count += int(ne.sum())
                if a.dtype != torch.bool:
                    worst = max(worst, float((a[ne].to(torch.float64) - b[ne].to(torch.float64)).abs().max()))
                else:
                    worst = 1.0
            continue
        a64 = a.to(torch.complex128 if a.is_complex() or b.is_complex() else torch.float64)
        b64 = b.to(a64.dtype)
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        d = (a64 - b64).abs()
        d[both_nan] = 0
        d = torch.nan_to_num(d, nan=math.inf)
        bad = d > atol
        if bool(bad.any()):
            count += int(bad.sum())
            worst = max(worst, float(d.max()))
    if count and status == "equal":
        status = "values"
    return ItemDiff(key, status, count, fx.numel(), worst,
                    f"{str(x.dtype).removeprefix('torch.')} vs {str(y.dtype).removeprefix('torch.')}"
                    if x.dtype != y.dtype else "")


def diff_checkpoints(a: str, b: str, *, atol: float = 0.0, keys: list[str] | None = None,
                     buffer: int | str = "128MiB", progress: bool | None = None, **options: Any) -> DiffReport:
    """Which keys of checkpoints ``a`` and ``b`` differ, and by how much (max abs, count), with
    memory for about one batch of each. Non-tensor items are compared by their stored bytes
    (never unpickled)."""
    budget = parse_size(buffer, "buffer")
    A = CheckpointTensors(a, **options)
    B = CheckpointTensors(b, **options)
    rep = DiffReport(a, b, atol)
    try:
        ka = select_keys(list(A.tensors) + A.objects, keys) if keys else list(A.tensors) + A.objects
        kb = set(select_keys(list(B.tensors) + B.objects, keys) if keys else list(B.tensors) + B.objects)
        common = [k for k in ka if k in kb]
        rep.items += [ItemDiff(k, "only_a") for k in ka if k not in kb]
        rep.items += [ItemDiff(k, "only_b") for k in sorted(kb - set(ka))]
        tensors, objects = [], []
        for k in common:
            if (k in A.tensors) != (k in B.tensors):
                rep.items.append(ItemDiff(k, "shape", detail="a tensor in one, an object in the other"))
            elif k in A.tensors and A.shape(k) != B.shape(k):
                rep.items.append(ItemDiff(k, "shape", detail=f"{list(A.shape(k))} vs {list(B.shape(k))}"))
            elif k in A.tensors:
                tensors.append(k)
            else:
                objects.append(k)
        if objects:
            ra, rb = A.load_raw_objects(objects), B.load_raw_objects(objects)
            rep.items += [ItemDiff(k, "equal" if ra[k] == rb[k] else "bytes") for k in objects]
        bar = Progress(f"comparing {a} with {b}", sum(A.nbytes(k) for k in tensors), progress, logger)
        for batch in A.batches(tensors, budget):
            xa, xb = A.load(batch), B.load(batch)
            for k in batch:
                rep.items.append(_compare(k, xa.pop(k), xb.pop(k), atol))
                bar.advance(A.nbytes(k))
        bar.close()
    finally:
        A.close()
        B.close()
    order = {k: i for i, k in enumerate(list(A.tensors) + A.objects + sorted(set(B.tensors) | set(B.objects)))}
    rep.items.sort(key=lambda d: order.get(d.key, 0))
    return rep
