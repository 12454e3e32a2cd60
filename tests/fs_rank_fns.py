"""Functions run on gloo ranks by tests/test_storage_fs.py (module-level so spawn can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dcp_ext


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors every rank can rebuild identically."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 48, generator=g),
        "b": torch.randn(48, generator=g).to(torch.bfloat16),
        "emb": torch.randint(0, 1000, (40, 12), generator=g, dtype=torch.int64),
        "scale": torch.tensor(1.5),
    }


def _placements(kind: str):
    return {"row": [Shard(0)], "col": [Shard(1)], "rep": [Replicate()]}[kind]


def make_dtensor_state(seed: int, layout: dict[str, str]) -> dict:
    ws = dist.get_world_size()
    mesh = init_device_mesh("cpu", (ws,))
    ref = reference_state(seed)
    out = {}
    for k, t in ref.items():
        kind = layout.get(k, "rep")
        if t.dim() == 0 or (kind == "col" and t.dim() < 2):
            kind = "rep"
        out[k] = distribute_tensor(t.clone(), mesh, _placements(kind))
    out["step"] = 7
    out["meta"] = {"note": "hello", "ranks": ws}
    return out


def empty_like_state(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            local = torch.zeros_like(v.to_local())
            out[k] = DTensor.from_local(local, v.device_mesh, v.placements, run_check=False,
                                        shape=v.shape, stride=v.stride())
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, dict):
            out[k] = {kk: None for kk in v}
        else:
            out[k] = None
    return out


def save_dtensors(url: str, seed: int, layout: dict[str, str], options: dict | None = None) -> int:
    state = make_dtensor_state(seed, layout)
    w = dcp_ext.storage_writer(url, **(options or {}))
    dcp.save(state, storage_writer=w)
    return w.stats.bytes_written


def load_dtensors_and_compare(url: str, seed: int, layout: dict[str, str], reader: str = "ours",
                              options: dict | None = None) -> dict:
    """Load into a (possibly different) sharding; compare full tensors exactly to the reference."""
    target = empty_like_state(make_dtensor_state(seed + 1000, layout))  # other values, same shapes
    if reader == "ours":
        r = dcp_ext.storage_reader(url, **(options or {}))
    else:
        r = dcp.FileSystemReader(url)
    dcp.load(target, storage_reader=r)
    ref = reference_state(seed)
    equal = {k: bool(torch.equal(target[k].full_tensor(), ref[k])) for k in ref}
    stats = getattr(r, "stats", None)
    return {"equal": equal, "step": target["step"], "meta": target["meta"],
            "bytes_read": getattr(stats, "bytes_read", None), "bytes_needed": getattr(stats, "bytes_needed", None)}


def save_stock(url: str, seed: int, layout: dict[str, str]) -> None:
    dcp.save(make_dtensor_state(seed, layout), storage_writer=dcp.FileSystemWriter(url))


def save_plain_replicated(url: str) -> list[int]:
    """Every rank holds the same plain tensors: dedup must spread the bytes over ranks."""
    g = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(256, 256, generator=g) for i in range(8)}
    w = dcp_ext.storage_writer(url)
    dcp.save(state, storage_writer=w)
    return [w.stats.bytes_written]


def save_failing(url: str, bad_rank: int) -> None:
    """A save whose data writing fails on one rank (an object that cannot be pickled)."""
    state = {"w": torch.ones(16) * dist.get_rank()}
    if dist.get_rank() == bad_rank:
        state["bad"] = _Unpicklable()
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, overwrite=True))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("this object refuses to be saved")


def async_save_and_load(url: str) -> bool:
    state = make_dtensor_state(5, {"w": "row"})
    fut = dcp.async_save(state, storage_writer=dcp_ext.storage_writer(url))
    fut.result()
    target = empty_like_state(state)
    dcp.load(target, storage_reader=dcp_ext.storage_reader(url))
    return all(torch.equal(target[k].full_tensor(), state[k].full_tensor()) for k in ("w", "b", "emb"))
