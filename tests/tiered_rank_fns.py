"""Functions run on gloo ranks (and in subprocesses) by tests/test_tiered.py.

Importing this module registers two test-only durable backends:

* ``slowfs://PATH``: a local directory whose writes sleep ``DCP_EXT_TEST_SLOW_S`` seconds
  (default 0.02) per ``write`` call: a slow durable tier, shared by all ranks. While the file
  named by ``DCP_EXT_TEST_GATE`` exists, every write but a file's first, and its close, block
  (a durable tier stuck mid-file, for as long as a test needs: no timing involved).
* ``failfs://PATH``: a local directory whose data-file writes fail: a broken durable tier.
* ``fail1fs://PATH``: only rank 1's data files cannot be created there.
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
from dcp_ext.tiered import pending_persists, wait_persisted
from tests.fs_rank_fns import empty_like_state, make_dtensor_state, reference_state


# -- test backends -------------------------------------------------------------------------

GATE_ENV = "DCP_EXT_TEST_GATE"


def wait_gate(max_s: float = 600.0) -> None:
    """Block while the gate file (``$DCP_EXT_TEST_GATE``) exists; fail loudly after ``max_s``."""
    gate = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + max_s
    while gate and os.path.exists(gate):
        if time.monotonic() > deadline:
            raise StorageError(f"test gate {gate} was not opened within {max_s}s")
        time.sleep(0.01)


class _SlowWriter(BlobWriter):
    def __init__(self, inner: BlobWriter, delay: float):
        self.inner, self.delay = inner, delay

    def write(self, data) -> int:
        time.sleep(self.delay)
        if getattr(self, "_wrote", False):  # the first write of each file goes through, flushed
            wait_gate()
        n = self.inner.write(data)
        self._wrote = True
        f = getattr(self.inner, "f", None)  # make the partial file visible to the test
        if f is not None:
            f.flush()
        return n

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> None:
        wait_gate()  # a gated file is never completed, however small
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


class FailRank1Store(SlowStore):
    """Only rank 1's data files fail to persist: the other ranks must learn it, not hang."""

    def open_writer(self, relpath: str) -> BlobWriter:
        if relpath.startswith("__1_"):
            raise StorageError(f"injected failure creating {self.root}/{relpath}")
        return super().open_writer(relpath)


def _register() -> None:
    from dcp_ext.storage.reader import ExtStorageReader
    from dcp_ext.storage.writer import ExtStorageWriter

    for name, cls in (("slowfs", SlowStore), ("failfs", FailStore), ("fail1fs", FailRank1Store)):
        register_backend(Backend(name, (name,), lambda url, cfg, c=cls: ExtStorageWriter(c(url, cfg), cfg),
                                 lambda url, cfg, c=cls: ExtStorageReader(c(url, cfg), cfg),
                                 description="test backend"), replace=True)


_register()


class LogCapture(logging.Handler):
    """Collects dcp_ext.tiered log lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.log = logging.getLogger("dcp_ext.tiered")

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


def node_cache(base: str, ranks_per_node: int = 2) -> str:
    """Fake "nodes" (two ranks each by default): rank // ranks_per_node picks the node's cache dir."""
    return os.path.join(base, f"node{dist.get_rank() // ranks_per_node}")


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


def save_nodes(url: str, base: str, seed: int, tier: dict) -> dict:
    """Save with the given ``tier`` options, one cache dir per fake node; report the replicas."""
    state = make_dtensor_state(seed, LAYOUT)
    with LogCapture() as logs:
        w = dcp_ext.storage_writer(url, cache=node_cache(base, tier["ranks_per_node"]), tier=tier)
        dcp.save(state, storage_writer=w)
    w.wait_persisted(300)
    return {"replicas": sorted(f for f in os.listdir(w.fast_dir) if f.startswith("replica_of_rank")),
            "replicate": w.replicate, "logs": logs.lines}


def load_nodes(url: str, base: str, seed: int, tier: dict) -> dict:
    return _load(url, seed, node_cache(base, tier["ranks_per_node"]), tier=tier)


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


# -- one rank cannot persist ------------------------------------------------------------------

def one_rank_fails_to_persist(root: str, base: str, seed: int) -> dict:
    url = f"fail1fs://{root}/step"
    tier = {"ranks_per_node": 2, "persist_timeout": 300}
    w = dcp_ext.storage_writer(url, cache=node_cache(base), tier=tier)
    dcp.save(make_dtensor_state(seed, LAYOUT), storage_writer=w)
    try:
        w.wait_persisted(600)
        err = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        err = f"{type(e).__name__}: {e}"
    return {"error": err, "fast": _load(url, seed, node_cache(base), tier={"ranks_per_node": 2})}


# -- back-to-back saves with a slow durable tier -------------------------------------------

def _ungate(gate: str) -> None:
    """Open the gate (rank 0 removes the file) and stop gating new writers on this rank."""
    if dist.get_rank() == 0:
        try:
            os.unlink(gate)
        except FileNotFoundError:
            pass
    os.environ.pop(GATE_ENV, None)


def _gated(base: str) -> str:
    """Close the shared durable-tier gate (every rank), return its path; open it with os.unlink."""
    gate = os.path.join(base, "durable.gate")
    os.makedirs(base, exist_ok=True)
    open(gate, "a").close()
    os.environ[GATE_ENV] = gate
    return gate


def back_to_back(root: str, base: str, n: int) -> dict:
    """``n`` async saves in a row (each waits only for the previous *fast* commit) while the
    durable tier is stuck (gated): all ``n`` persists are pending at once, then released."""
    # keep_last=n: every save stays in the fast tier (retention has tests of its own)
    opts = {"cache": node_cache(base), "tier": {"ranks_per_node": 2, "chunk_size": "64KiB", "keep_last": n}}
    # The next state is built (distribute_tensor: a scatter on the default group) while the
    # previous async save's thread still runs DCP's collectives: as stock DCP advises, the
    # async saves get a process group of their own, or the two threads' collectives interleave.
    ckpt_group = dist.new_group(backend="gloo")
    gate = _gated(base)
    dist.barrier()  # the gate is closed on every rank before any save
    try:
        fut = None
        t0 = time.perf_counter()
        for i in range(n):
            state = make_dtensor_state(100 + i, LAYOUT)
            if fut is not None:
                fut.result()  # the previous save's synchronous part (fast tier) only
            w = dcp_ext.storage_writer(f"slowfs://{root}/step_{i}", **opts)
            fut = dcp.async_save(state, storage_writer=w, process_group=ckpt_group)
        fut.result()
        t_fast = time.perf_counter() - t0
        # the durable tier is stuck: no persist can have finished, and every fast copy is loadable
        pending = pending_persists()
        pending_after_saves = len(pending)
        states_while_stuck = sorted({h.state.split(" ")[0] for h in pending})
        fast_while_stuck = [_load(f"slowfs://{root}/step_{i}", 100 + i, opts["cache"], tier={"ranks_per_node": 2})
                            for i in range(n)]
        dist.barrier()  # every rank has looked; now let the durable tier go
    finally:
        _ungate(gate)
    results = wait_persisted(300)
    t_durable = time.perf_counter() - t0
    out = {"pending_after_saves": pending_after_saves, "states_while_stuck": states_while_stuck,
           "fast_while_stuck": fast_while_stuck, "t_fast": t_fast, "t_durable": t_durable,
           "persisted": sorted(r.url for r in results), "loads": []}
    for i in range(n):
        url = f"slowfs://{root}/step_{i}"
        out["loads"].append({"fast": _load(url, 100 + i, opts["cache"], tier={"ranks_per_node": 2}),
                             "durable": _load(url, 100 + i, os.path.join(base, f"none{dist.get_rank()}"))})
    return out


MUTATED = ("w", "b", "emb")


def _expected(seed: int, bumps: int) -> dict[str, torch.Tensor]:
    """reference_state(seed) after ``bumps`` in-place ``add_(1000)`` of the MUTATED tensors."""
    ref = reference_state(seed)
    for k in MUTATED:
        for _ in range(bumps):
            ref[k].add_(1000)
    return ref


def _load_expect(url: str, cache: str, expect: dict[str, torch.Tensor], **opts) -> dict:
    target = empty_like_state(make_dtensor_state(0, LAYOUT))
    with LogCapture() as logs:
        r = dcp_ext.storage_reader(url, cache=cache, **opts)
        dcp.load(target, storage_reader=r)
    equal = {k: bool(torch.equal(target[k].full_tensor(), v)) for k, v in expect.items()}
    return {"equal": equal, "tier": r.tier, "logs": logs.lines}


def pooled_back_to_back(root: str, base: str, n: int) -> dict:
    """The whole stack: one state mutated in place right after every ``dcp_ext.async_save``
    (PooledStager, one pool reused) into tiered writers whose durable tier is stuck: each
    checkpoint holds the values as of its call, in both tiers, and nothing is overwritten."""
    opts = {"cache": node_cache(base), "tier": {"ranks_per_node": 2, "chunk_size": "64KiB", "keep_last": n}}
    ckpt_group = dist.new_group(backend="gloo")
    state = make_dtensor_state(300, LAYOUT)
    stager = dcp_ext.PooledStager(wait_timeout=600)
    gate = _gated(base)
    dist.barrier()
    try:
        fut = None
        for i in range(n):
            w = dcp_ext.storage_writer(f"slowfs://{root}/step_{i}", **opts)
            # waits (inside stage) for the previous upload, i.e. its fast commit, not the durable one
            fut = dcp_ext.async_save(state, storage_writer=w, async_stager=stager, process_group=ckpt_group)
            with torch.no_grad():  # the training step goes on at once, in place
                for k in MUTATED:
                    state[k].to_local().add_(1000)
        fut.result()
        pending_after_saves = len(pending_persists())
        dist.barrier()
    finally:
        _ungate(gate)
    wait_persisted(300)
    stats = dict(stager.stats)
    stager.close()
    loads = []
    for i in range(n):
        url = f"slowfs://{root}/step_{i}"
        loads.append({"fast": _load_expect(url, opts["cache"], _expected(300, i), tier={"ranks_per_node": 2}),
                      "durable": _load_expect(url, os.path.join(base, f"none{dist.get_rank()}"), _expected(300, i))})
    return {"pending_after_saves": pending_after_saves, "stats": stats, "loads": loads}


# -- kill -9 during background persistence (run as a script) --------------------------------

def single_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 1024, generator=g), "i": torch.arange(seed, seed + 100)}


def _killed_saver(root: str, cache: str) -> None:
    """Run by the kill -9 test with ``$DCP_EXT_TEST_GATE`` closed: step 2's persist gets stuck
    after its first write, until the test kills this process."""
    opts = {"cache": cache, "tier": {"chunk_size": "64KiB"}}
    w = dcp_ext.storage_writer(f"{root}/step_1", cache=cache)  # a fast durable tier for step 1
    dcp.save(single_state(1), storage_writer=w)
    w.wait_persisted(60)
    w2 = dcp_ext.storage_writer(f"slowfs://{root}/step_2", **opts)
    dcp.save(single_state(2), storage_writer=w2)
    print("FAST_COMMITTED", flush=True)
    w2.wait_persisted(600)  # killed before this returns (the gate stays closed)
    print("PERSISTED", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "killed_saver":
        _killed_saver(sys.argv[2], sys.argv[3])
