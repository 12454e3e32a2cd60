"""Functions run on gloo ranks by tests/test_corruption.py: a row-sharded DTensor saved by 2
ranks and loaded, resharded, by 4."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dcp_ext

BLOCK = 4096
ROWS, COLS = 256, 1001  # float32: each saved half is 512,512 bytes = 125 whole 4 KiB blocks + a partial one


def full_tensor(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))


def _sharded(t: torch.Tensor) -> DTensor:
    return distribute_tensor(t, init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(0)])


def save_rows(url: str, seed: int, options: dict) -> None:
    dcp.save({"w": _sharded(full_tensor(seed))}, storage_writer=dcp_ext.storage_writer(url, **options))


def load_rows(url: str, seed: int, options: dict) -> dict:
    """Load this rank's rows; the error message, or the (global) positions that differ from the
    reference, bit for bit."""
    full = full_tensor(seed)
    target = {"w": _sharded(torch.zeros_like(full))}
    try:
        dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **options))
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        return {"error": f"{type(e).__name__}: {e}"}
    local = target["w"].to_local()
    first = dist.get_rank() * local.shape[0]
    mine = full[first:first + local.shape[0]]
    changed = (local.view(torch.int32) != mine.view(torch.int32)).nonzero()
    return {"changed": [[first + int(r), int(c)] for r, c in changed]}
