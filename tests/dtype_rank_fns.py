"""Every dtype DCP saves, with random bit patterns, and the functions tests/test_dtypes_ranged.py
runs on gloo ranks (DTensors built from local shards: no collective touches the data, since
gloo cannot move every dtype)."""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import dcp_ext
from tests.support.torch_features import stock_loads_dtype

_NAMES = ["float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
          "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
          "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
          "float4_e2m1fn_x2"]
#: every dtype stock DCP saves and loads (the ones this torch has and can copy: torch 2.9 has
#: float4_e2m1fn_x2 without a copy kernel)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _NAMES
                                  if hasattr(torch, n) and stock_loads_dtype(getattr(torch, n))}
SHAPE = (37, 53)


def sample(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (bool: 0 or 1): every bit pattern the dtype has."""
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and negative zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def full_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: sample(dt, SHAPE, g) for name, dt in DTYPES.items()}


def _shard(t: torch.Tensor, dim: int) -> DTensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    local = torch.chunk(t, world, dim)[rank].contiguous()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=t.shape, stride=t.stride())


def _objects() -> dict:
    return {"raw_bytes": bytes(range(256)) + b"\x00end", "bytes_io": io.BytesIO(b"\xff\x00" * 300)}


def save_sharded(url: str, seed: int, dim: int, options: dict) -> None:
    state = {k: _shard(v, dim) for k, v in full_state(seed).items()}
    dcp.save({**state, **_objects()}, storage_writer=dcp_ext.storage_writer(url, checksum_block_size="4KiB",
                                                                          **options))


def load_sharded_and_compare(url: str, seed: int, dim: int, options: dict) -> dict:
    full = full_state(seed)
    target = {k: _shard(torch.zeros(v.shape, dtype=v.dtype), dim) for k, v in full.items()}
    target.update(raw_bytes=None, bytes_io=None)
    dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **options))
    rank, world = dist.get_rank(), dist.get_world_size()
    bad = [k for k, v in full.items() if not same_bits(target[k].to_local(), torch.chunk(v, world, dim)[rank])]
    want = _objects()
    return {"bad": bad, "raw_bytes": target["raw_bytes"] == want["raw_bytes"],
            "bytes_io": isinstance(target["bytes_io"], io.BytesIO)
            and target["bytes_io"].getvalue() == want["bytes_io"].getvalue()}
