"""Functions run on gloo ranks (and in subprocesses) by tests/test_tiered.py.

Importing this module registers two test-only durable backends:

* ``slowfs://PATH``: a local directory whose writes sleep ``DCP_EXT_TEST_SLOW_S`` seconds
  (default 0.02) per ``write`` call: a slow durable tier, shared by all ranks.
* ``failfs://PATH``: a local directory whose data-file writes fail: a broken durable tier.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import StorageError
from dcp_ext.storage import Backend, register_backend
from dcp_ext.storage.base import BlobWriter
from dcp_ext.storage.fs import LocalStore
from dcp_ext.storage.manifest import METADATA_NAME
from dcp_ext.storage.tiered import pending_persists, wait_persisted
from tests.fs_rank_fns import empty_like_state, make_dtensor_state, reference_state


# -- test backends -------------------------------------------------------------------------

class _SlowWriter(BlobWriter):
    def __init__(self, inner: BlobWriter, delay: float):
        self.inner, self.delay = inner, delay

    def write(self, data) -> int:
        time.sleep(self.delay)
        return self.inner.write(data)

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class SlowStore(LocalStore):
    """A local directory with slow data writes (the test's "durable tier")."""

    def __init__(self, url: str, config=None):
        super().__init__(url.split("://", 1)[1], config)
        self.url = url

    def open_writer(self, relpath: str) -> BlobWriter:
        return _SlowWriter(super().open_writer(relpath), float(os.environ.get("DCP_EXT_TEST_SLOW_S", "0.02")))


class FailStore(SlowStore):
    """Data-file writes fail after the first byte: persistence must report the object."""

    def open_writer(self, relpath: str) -> BlobWriter:
        inner = LocalStore.open_writer(self, relpath)
        store = self

        class W(_SlowWriter):
            def write(self, data) -> int:
                raise StorageError(f"injected failure writing {store.root}/{relpath}")

        return W(inner, 0)


def _register() -> None:
    from dcp_ext.storage.reader import ExtStorageReader
    from dcp_ext.storage.writer import ExtStorageWriter

    for name, cls in (("slowfs", SlowStore), ("failfs", FailStore)):
        register_backend(Backend(name, (name,), lambda url, cfg, c=cls: ExtStorageWriter(c(url, cfg), cfg),
                                 lambda url, cfg, c=cls: ExtStorageReader(c(url, cfg), cfg),
                                 description="test backend"), replace=True)


_register()


class LogCapture(logging.Handler):
    """Collects dcp_ext.storage.tiered log lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.log = logging.getLogger("dcp_ext.storage.tiered")

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.old = self.log.level
        self.log.setLevel(logging.INFO)
        self.log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.log.removeHandler(self)
        self.log.setLevel(self.old)


LAYOUT = {"w": "row", "emb": "col"}


def node_cache(base: str) -> str:
    """Two fake "nodes" of two ranks each: rank // 2 picks the node's cache dir."""
    return os.path.join(base, f"node{dist.get_rank() // 2}")


def _check(target: dict, seed: int) -> dict[str, bool]:
    ref = reference_state(seed)
    return {k: bool(torch.equal(target[k].full_tensor(), ref[k])) for k in ref}


def _load(url: str, seed: int, cache: str, **opts) -> dict:
    target = empty_like_state(make_dtensor_state(seed + 1000, LAYOUT))
    with LogCapture() as logs:
        r = dcp_ext.storage_reader(url, cache=cache, **opts)
        dcp.load(target, storage_reader=r)
    return {"equal": _check(target, seed), "step": target["step"], "tier": r.tier, "sources": r.sources,
            "logs": logs.lines}


# -- node loss -----------------------------------------------------------------------------

def save_two_nodes(url: str, base: str, seed: int) -> dict:
    state = make_dtensor_state(seed, LAYOUT)
    w = dcp_ext.storage_writer(url, cache=node_cache(base), tier={"ranks_per_node": 2}, files_per_rank=2)
    dcp.save(state, storage_writer=w)
    fast_after_save = sorted(os.listdir(w.fast_dir))
    res = w.wait_persisted(60)
    return {"fast_dir": w.fast_dir, "fast_files": fast_after_save, "replicate": w.replicate,
            "persisted_bytes": res.bytes}


def load_two_nodes(url: str, base: str, seed: int) -> dict:
    return _load(url, seed, node_cache(base), tier={"ranks_per_node": 2})


# -- async save: the checkpoint holds the values as of the call ------------------------------

def async_save_then_mutate(url: str, base: str, seed: int) -> dict:
    state = make_dtensor_state(seed, LAYOUT)
    w = dcp_ext.storage_writer(url, cache=node_cache(base), tier={"ranks_per_node": 2})
    fut = dcp.async_save(state, storage_writer=w)
    with torch.no_grad():  # the training step goes on at once
        for k in ("w", "b", "emb"):
            state[k].to_local().add_(1000)
    fut.result()
    w.wait_persisted(60)
    fast = _load(url, seed, node_cache(base), tier={"ranks_per_node": 2})
    durable = _load(url, seed, os.path.join(base, f"empty{dist.get_rank()}"))  # no fast copy there
    return {"fast": fast, "durable": durable}


# -- back-to-back saves with a slow durable tier -------------------------------------------

def back_to_back(root: str, base: str, n: int) -> dict:
    """``n`` async saves in a row (each waits only for the previous *fast* commit)."""
    # keep_last=n: every save stays in the fast tier (retention has tests of its own)
    opts = {"cache": node_cache(base), "tier": {"ranks_per_node": 2, "chunk_size": "64KiB", "keep_last": n}}
    # The next state is built (distribute_tensor: a scatter on the default group) while the
    # previous async save's thread still runs DCP's collectives: as stock DCP advises, the
    # async saves get a process group of their own, or the two threads' collectives interleave.
    ckpt_group = dist.new_group(backend="gloo")
    fut = None
    t0 = time.perf_counter()
    writers = []
    for i in range(n):
        state = make_dtensor_state(100 + i, LAYOUT)
        if fut is not None:
            fut.result()  # the previous save's synchronous part (fast tier) only
        w = dcp_ext.storage_writer(f"slowfs://{root}/step_{i}", **opts)
        writers.append(w)
        fut = dcp.async_save(state, storage_writer=w, process_group=ckpt_group)
    fut.result()
    pending_after_saves = len(pending_persists())
    t_fast = time.perf_counter() - t0
    results = wait_persisted(120)
    t_durable = time.perf_counter() - t0
    out = {"pending_after_saves": pending_after_saves, "t_fast": t_fast, "t_durable": t_durable,
           "persisted": sorted(r.url for r in results), "loads": []}
    for i in range(n):
        url = f"slowfs://{root}/step_{i}"
        out["loads"].append({"fast": _load(url, 100 + i, opts["cache"], tier={"ranks_per_node": 2}),
                             "durable": _load(url, 100 + i, os.path.join(base, f"none{dist.get_rank()}"))})
    return out


# -- kill -9 during background persistence (run as a script) --------------------------------

def single_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 1024, generator=g), "i": torch.arange(seed, seed + 100)}


def _killed_saver(root: str, cache: str) -> None:
    os.environ["DCP_EXT_TEST_SLOW_S"] = "0.2"
    opts = {"cache": cache, "tier": {"chunk_size": "64KiB"}}
    w = dcp_ext.storage_writer(f"{root}/step_1", cache=cache)  # a fast durable tier for step 1
    dcp.save(single_state(1), storage_writer=w)
    w.wait_persisted(60)
    w2 = dcp_ext.storage_writer(f"slowfs://{root}/step_2", **opts)
    dcp.save(single_state(2), storage_writer=w2)
    print("FAST_COMMITTED", flush=True)
    w2.wait_persisted(600)  # killed before this returns
    print("PERSISTED", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "killed_saver":
        _killed_saver(sys.argv[2], sys.argv[3])
