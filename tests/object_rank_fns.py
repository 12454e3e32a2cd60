"""Functions run on gloo ranks by tests/test_object_stores.py (S3 and GCS test servers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

import dcp_ext
from dcp_ext import ReshardLoadPlanner, ReshardSavePlanner
from tests import megatron_gpt as mg
from tests.fs_rank_fns import empty_like_state, make_dtensor_state, reference_state
from tests.support.errors import error_text

SEED = 11
CFG = mg.Cfg(vocab=512, hidden=128, n_heads=8, n_kv=4, head_dim=16, ffn=512, n_layers=4)


def _fsspec_writer(url: str, storage_options: dict):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, **storage_options)


def _fsspec_reader(url: str, storage_options: dict):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **storage_options)


def save_stock_fsspec(url: str, seed: int, layout: dict, storage_options: dict) -> None:
    """Stock ``FsspecWriter`` (s3fs / gcsfs) writes a DTensor state."""
    dcp.save(make_dtensor_state(seed, layout), storage_writer=_fsspec_writer(url, storage_options))


def load_stock_fsspec(url: str, seed: int, layout: dict, storage_options: dict) -> dict:
    """Stock ``FsspecReader`` loads (a checkpoint we wrote) into a DTensor state."""
    target = empty_like_state(make_dtensor_state(seed + 1000, layout))
    dcp.load(target, storage_reader=_fsspec_reader(url, storage_options))
    ref = reference_state(seed)
    return {"equal": {k: bool(torch.equal(target[k].full_tensor(), ref[k])) for k in ref},
            "step": target["step"], "meta": target["meta"]}


def reshard_planners(url: str, save: tuple[int, int, int], load: tuple[int, int, int], options: dict) -> dict:
    """Megatron-style plain shards saved at ``save`` (TPxPPxDP) through the object store with our
    planner, loaded at ``load``: exact parameters and this rank's byte counts."""
    rank = dist.get_rank()
    full = mg.full_params(SEED, CFG)
    src, dst = mg.Topo(*save), mg.Topo(*load)
    sd = {"model": mg.local_params(src, rank, full, CFG), "step": 3}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **options), planner=ReshardSavePlanner(src.layout(rank, CFG)))
    sd = {"model": mg.empty_like_local(dst, rank, CFG), "step": -1}
    reader = dcp_ext.storage_reader(url, **options)
    dcp.load(sd, storage_reader=reader, planner=ReshardLoadPlanner(dst.layout(rank, CFG)))
    expect = mg.local_params(dst, rank, full, CFG)
    return {"bad": [k for k in expect if not torch.equal(sd["model"][k], expect[k])], "step": sd["step"],
            "bytes_read": reader.stats.bytes_read, "bytes_needed": reader.stats.bytes_needed,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in expect.values())}


def full_params_from_reshard_checkpoint(url: str, options: dict) -> list[str]:
    """Stock ``DefaultLoadPlanner`` loads full global tensors from a planner-written checkpoint."""
    full = mg.full_params(SEED, CFG)
    target = {"model": {k: torch.zeros_like(v) for k, v in full.items()}, "step": -1}
    dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **options), planner=DefaultLoadPlanner())
    return [k for k, v in full.items() if not torch.equal(target["model"][k], v)]


def save_expect_failure(url: str, options: dict) -> str:
    """A save whose upload fails for good (the test's proxy refuses one rank's data); every rank
    must see the failure."""
    state = make_dtensor_state(21, {"w": "row", "emb": "row"})
    try:
        dcp.save(state, storage_writer=dcp_ext.storage_writer(url, **options))
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    return "no error"


def load_expect_failure(url: str, options: dict) -> str:
    target = empty_like_state(make_dtensor_state(21, {"w": "row"}))
    try:
        return error_text(lambda: dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **options)))
    except AssertionError:  # it raised nothing
        return "no error"
