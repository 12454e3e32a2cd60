"""Functions run on gloo ranks (and as a script) by tests/test_tensorstore.py."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed.checkpoint as dcp

import dcp_ext

from . import fs_rank_fns as fr

TS = {"backend": "tensorstore"}


def dtensor_roundtrip(url: str, save_layout: dict, load_layout: dict, options: dict,
                      load_options: dict | None = None) -> dict:
    """Save DTensors sharded by ``save_layout`` with the tensorstore backend, load them sharded
    by ``load_layout`` (with ``load_options`` when given): exact full tensors, objects, and this
    rank's counts."""
    opts = {**TS, **options}
    writer = dcp_ext.storage_writer(url, **opts)
    dcp.save(fr.make_dtensor_state(11, save_layout), storage_writer=writer)
    target = fr.empty_like_state(fr.make_dtensor_state(1011, load_layout))
    reader = dcp_ext.storage_reader(url, **{**TS, **(options if load_options is None else load_options)})
    dcp.load(target, storage_reader=reader)
    ref = fr.reference_state(11)
    return {"equal": {k: bool(torch.equal(target[k].full_tensor(), ref[k])) for k in ref},
            "step": target["step"], "meta": target["meta"], "direct": reader.stats.direct,
            "items": reader.stats.items, "native_read": reader.stats.native, "native_written": writer.stats.native,
            "bytes_read": reader.stats.bytes_read, "bytes_needed": reader.stats.bytes_needed}


def load_expect_failure(url: str, layout: dict, options: dict) -> str:
    target = fr.empty_like_state(fr.make_dtensor_state(11, layout))
    try:
        dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **TS, **options))
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    return "no error"


def big_state(seed: int) -> dict:
    """A state of many tensors (for the killed-save test)."""
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.w": torch.randn(256, 256, generator=g) for i in range(16)}


class _StallingPlanner(dcp.DefaultSavePlanner):
    """Announces on stdout when the 4th tensor is requested, then never returns it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def resolve_data(self, write_item):
        self.n += 1
        if self.n == 4:
            print("WRITING", flush=True)
            import time

            while True:
                time.sleep(1)
        return super().resolve_data(write_item)


def _killed_saver(url: str) -> None:
    dcp.save(big_state(2), storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore={"inflight_bytes": "1MiB"}),
             planner=_StallingPlanner())


if __name__ == "__main__":
    if sys.argv[1] == "killed_saver":
        _killed_saver(sys.argv[2])
    os._exit(0)
