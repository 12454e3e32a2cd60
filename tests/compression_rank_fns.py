"""Functions run on gloo ranks by tests/test_compression.py (issue 17): stock DCP 2.13 formats
written by stock's writers and loaded, resharded, by our reader; our compressed checkpoints loaded
at another world size. Expected values are computed here from the seeded source state, never by
the code under test."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import filesystem as _stock_filesystem
from torch.distributed.checkpoint._extension import ZStandard

import dcp_ext
from tests.support.torch_features import SAFETENSORS_FORMAT

#: stock 2.13 DCP formats: writer keyword arguments (those this torch writes: 2.7 has no SAFETENSORS)
FORMATS = ("default", "safetensors", "zstd", "both") if SAFETENSORS_FORMAT else ("default", "zstd")


def format_kwargs(fmt: str) -> dict:
    st = {"serialization_format": _stock_filesystem.SerializationFormat.SAFETENSORS} if SAFETENSORS_FORMAT else {}
    zs = {"_extensions": [ZStandard()]}
    return {"default": {}, "safetensors": st, "zstd": zs, "both": {**st, **zs}}[fmt]


def full_state(seed: int, scale: int = 1, floats: bool = False) -> dict[str, torch.Tensor]:
    """The source tensors (every dim divisible by 4: any 1/2/4-way chunk is even). ``scale``
    multiplies the rows (more blocks per tensor); ``floats``: floating-point ones only."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "w.bf16": (torch.randn(64 * scale, 96, generator=g) * 0.02).to(torch.bfloat16),  # compresses ~1.3x
        "m.f32": torch.randn(48 * scale, 40, generator=g),  # random fp32: barely compresses
        "steps.i64": torch.arange(96 * 8 * scale, dtype=torch.int64).reshape(96 * scale, 8) * 3,
        "mask.bool": torch.rand(32 * scale, 24, generator=g) > 0.5,
        "h.f16": torch.randn(40 * scale, 64, generator=g).half(),
    }
    return {k: v for k, v in out.items() if v.is_floating_point()} if floats else out


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def dtensor(full: torch.Tensor, dim: int) -> Any:
    from torch.distributed.tensor import DTensor, Shard

    local = full.chunk(dist.get_world_size(), dim=dim)[dist.get_rank()]
    return DTensor.from_local(local.clone(), _mesh(), [Shard(dim)], run_check=False, shape=full.shape,
                              stride=full.stride())


def stock_writer(fmt: str, url: str, storage_options: dict | None) -> Any:
    """Stock's writer for ``url``: ``FileSystemWriter`` for a path, else ``FsspecWriter``."""
    if "://" not in url:
        return FileSystemWriter(url, **format_kwargs(fmt))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, **(storage_options or {}), **format_kwargs(fmt))


def save_stock(root: str, storage_options: dict | None, seed: int, formats: tuple[str, ...] = FORMATS) -> None:
    """Stock's writer saves row-sharded DTensors plus objects, once per format."""
    full = full_state(seed)
    for fmt in formats:
        state: dict[str, Any] = {k: dtensor(v, 0) for k, v in full.items()}
        state["extra"] = {"step": 7, "name": fmt}
        dcp.save(state, storage_writer=stock_writer(fmt, f"{root}/{fmt}", storage_options))


def _stats(r: Any) -> dict:
    s = r.stats
    return {"bytes_read": s.bytes_read, "bytes_needed": s.bytes_needed, "stored_bytes_needed": s.stored_bytes_needed,
            "blocks_decompressed": s.blocks_decompressed, "blocks_direct": s.blocks_direct,
            "blocks_verified": s.blocks_verified}


def load_ours(url: str, options: dict, seed: int, dim: int, objects: bool = True, scale: int = 1,
              floats: bool = False) -> dict:
    """Our reader loads ``url`` into DTensors sharded on ``dim``: the keys whose local values
    differ from the source's chunk, the objects, and the reader's byte counts."""
    full = full_state(seed, scale, floats)
    ws, rank = dist.get_world_size(), dist.get_rank()
    target: dict[str, Any] = {k: dtensor(torch.zeros_like(v), dim) for k, v in full.items()}
    if objects:
        target["extra"] = {"step": 0, "name": ""}
    r = dcp_ext.storage_reader(url, **options)
    dcp.load(target, storage_reader=r)
    bad = [k for k, v in full.items() if not torch.equal(target[k].to_local(), v.chunk(ws, dim=dim)[rank])]
    return {"bad": bad, "extra": target.get("extra"), **_stats(r)}


def load_formats(root: str, options: dict, seed: int, formats: tuple[str, ...] = FORMATS) -> dict:
    """Every format under ``root`` loaded by us at the saved sharding (rows) and resharded
    (columns)."""
    return {f"{fmt}/dim{dim}": load_ours(f"{root}/{fmt}", options, seed, dim) for fmt in formats for dim in (0, 1)}


# ----------------------------------------------------------------- HuggingFaceStorageWriter
def save_hf_distributed(path: str, seed: int, consolidate: bool) -> None:
    """Every rank writes its row shards as its own safetensors file (``save_distributed``), and
    with ``consolidate`` rank 0 then writes full tensors over them (plus the index; stock's
    consolidation handles floating-point dtypes only in torch 2.13)."""
    full = full_state(seed, floats=consolidate)
    state = {k: dtensor(v, 0) for k, v in full.items()}
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(path, save_distributed=True,
                                                                enable_consolidation=consolidate))


# --------------------------------------------------------- our compressed checkpoints, resharded
def load_rows(url: str, options: dict, seed: int, scale: int) -> dict:
    """Tensors only (the state saved by one process), loaded row-sharded at this world size."""
    return load_ours(url, options, seed, 0, objects=False, scale=scale)


def upload_dir(local: str, url: str, options: dict) -> list[str]:
    """Copy the files of a local directory (recursively) to ``url`` through our byte store."""
    store = dcp_ext.storage_writer(url, **options).store
    store.prepare_for_write()
    names = []
    for dirpath, _dirs, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local).replace(os.sep, "/")
            with open(os.path.join(dirpath, f), "rb") as src, store.open_writer(rel) as out:
                out.write(src.read())
            names.append(rel)
    return sorted(names)


def chunk_bytes(full: dict[str, torch.Tensor], ws: int) -> int:
    """Bytes of one rank's row chunk of every tensor."""
    return sum(math.prod(v.chunk(ws, 0)[0].shape) * v.element_size() for v in full.values())
