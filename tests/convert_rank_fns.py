"""Functions run on gloo ranks by tests/test_convert.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcp_ext


def full_weight() -> torch.Tensor:
    return torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6) / 7


def save_tp_halves(path: str) -> None:
    """Each of 2 ranks saves its half (rows) of one weight: a checkpoint with 2 chunks."""
    rank = dist.get_rank()
    layout = dcp_ext.ParallelLayout(tp_rank=rank, tp_size=2, rules={"w": dcp_ext.ShardSpec(0)})
    state = {"w": full_weight()[rank * 32:(rank + 1) * 32].clone(), "b": torch.ones(3)}
    dcp.save(state, storage_writer=dcp_ext.storage_writer(path), planner=dcp_ext.ReshardSavePlanner(layout))


class Opaque:
    """Not plain data: ``torch.load(weights_only=True)`` refuses it."""

    def __init__(self, x: int = 1):
        self.x = x


def _trip(path: str) -> None:
    with open(path, "w") as f:
        f.write("unpickled!")


class Tripwire:
    """Unpickling it creates ``path``: proof that something unpickled a stored object."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_trip, (self.path,))
