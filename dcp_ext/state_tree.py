"""A state dict as a template plus its unique tensors, and copies built from the template.

:func:`collect` walks a state dict once: every tensor (a DTensor's local shard) becomes a
:class:`~dcp_ext.host_pool.Leaf` (the same tensor object under two keys, tied weights, is one
leaf) and the template keeps the containers with :class:`Ref` markers in the tensors' places.
:func:`build` makes a copy of the state dict from the template with the staged tensors (views of a
pool) in place of the leaves: containers rebuilt, DTensors rewrapped, other values deep-copied
once at collection. The staging pool (:mod:`dcp_ext.staging`) uses both on every save.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .errors import StagingError
from .host_pool import Leaf

__all__ = ["ATOMIC", "Container", "Copy", "Ref", "add_leaf", "build", "collect", "make", "rewrap_dtensor"]

#: values kept as they are in a staged copy (immutable)
ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


@dataclass
class Ref:
    """A tensor's place in a template: its leaf index (and the DTensor around it, if any)."""

    index: int
    dtensor: Any = None


@dataclass
class Container:
    """A dict, list or tuple (or subclass) in a template: its type and its items."""

    kind: type
    items: list


@dataclass
class Copy:
    """A value that is neither container, tensor nor atomic: deep-copied once at collection."""

    value: Any


def make(kind: type, value: Any) -> Any:
    """``kind(value)``; the plain dict/list for a container type that cannot be built so."""
    try:
        return kind(value)
    except Exception:  # noqa: BLE001 - exotic container: fall back to the plain type
        return dict(value) if isinstance(value, dict) else list(value)


def rewrap_dtensor(src: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``src``'s mesh, placements and global shape around a staged local tensor.

    ``DTensor.from_local`` would move a CPU local tensor back to a CUDA mesh's device, so the
    constructor is used directly (its signature is stable since torch 2.1).
    """
    return DTensor(local, src._spec, requires_grad=False)


def collect(x: Any, path: str, leaves: list[Leaf], by_id: dict[int, Ref]) -> Any:
    """Return a template of ``x``: tensors replaced by ``Ref`` markers into ``leaves``."""
    if isinstance(x, torch.Tensor):
        if id(x) in by_id:  # the same tensor object under two keys (tied weights)
            return by_id[id(x)]
        if isinstance(x, DTensor):
            local = x._local_tensor
            ref = Ref(add_leaf(local, path, leaves), dtensor=x)
            leaves[ref.index].dtensor = True
        elif type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
            ref = Ref(add_leaf(x, path, leaves))
        else:
            raise StagingError(
                f"PooledStager cannot stage {type(x).__name__} at {path!r}: only torch.Tensor, "
                f"nn.Parameter and DTensor values are supported (convert ShardedTensor to DTensor)")
        by_id[id(x)] = ref
        return ref
    if isinstance(x, dict):
        return Container(type(x), [(k, collect(v, f"{path}.{k}" if path else str(k), leaves, by_id))
                                    for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        items = [collect(v, f"{path}.{i}" if path else str(i), leaves, by_id) for i, v in enumerate(x)]
        return Container(type(x), items)
    if isinstance(x, ATOMIC):
        return x
    return Copy(copy.deepcopy(x))


def add_leaf(t: torch.Tensor, path: str, leaves: list[Leaf]) -> int:
    """Append ``t`` (at ``path``) to ``leaves``, refusing tensors a pool cannot hold; its index."""
    if t.is_sparse or t.layout != torch.strided:
        raise StagingError(f"PooledStager cannot stage a {t.layout} tensor at {path!r}: only strided tensors")
    if t.is_quantized:
        raise StagingError(f"PooledStager cannot stage a quantized tensor at {path!r}")
    if t.device.type == "meta":
        raise StagingError(f"PooledStager cannot stage a meta tensor at {path!r}: it has no data")
    leaves.append(Leaf(path, t))
    return len(leaves) - 1


def build(node: Any, views: list[torch.Tensor]) -> Any:
    """The staged copy of a template: leaf ``i`` becomes ``views[i]`` (a fresh alias)."""
    if isinstance(node, Ref):
        # A fresh alias per save: it raises the pool storage's reference count, which is how
        # an untracked lease knows that someone may still read it.
        v = views[node.index].detach()
        if node.dtensor is not None:
            return rewrap_dtensor(node.dtensor, v)
        return v
    if isinstance(node, Container):
        if issubclass(node.kind, dict):
            d = {k: build(v, views) for k, v in node.items}
            return d if node.kind is dict else make(node.kind, d)
        items = [build(v, views) for v in node.items]
        if node.kind is list:
            return items
        if node.kind is tuple:
            return tuple(items)
        if hasattr(node.kind, "_fields"):  # namedtuple
            return node.kind(*items)
        return make(node.kind, items)
    if isinstance(node, Copy):
        return node.value
    return node
