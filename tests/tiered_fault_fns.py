"""Rank functions for tests/test_tiered_faults.py: node loss, srun-style launches, durable-tier
outages, corrupted copies, processes killed during a save or a persistence, PROCESS-mode saves.

Importing it registers two more test-only durable backends:

* ``downfs://PATH``: an unreachable durable tier. Every operation blocks while the file named by
  ``$DCP_EXT_TEST_DOWN_GATE`` exists (a store that does not answer), then fails.
* ``killfs://PATH``: a local directory whose process kills itself (``SIGKILL``) at its
  ``$DCP_EXT_TEST_KILL_AT``-th operation once armed (:func:`arm_kill`), after leaving a
  ``rank<r>`` file in ``$DCP_EXT_TEST_DEAD_DIR`` so the peer ranks die too (a job whose node
  crashed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import StorageError
from dcp_ext.storage import Backend, register_backend
from dcp_ext.storage.base import BlobWriter
from dcp_ext.storage.fs import LocalStore
from dcp_ext.storage.manifest import decode_manifest
from dcp_ext.storage.reader import ExtStorageReader
from dcp_ext.storage.writer import ExtStorageWriter
from dcp_ext.tiered import fast_dir_for
from tests.support.errors import error_text
from tests.tiered_rank_fns import LogCapture, SlowStore

DOWN_GATE_ENV = "DCP_EXT_TEST_DOWN_GATE"
HEALED_ENV = "DCP_EXT_TEST_HEALED"
_STORE_CALLS = ("prepare_for_write", "open_writer", "put_atomic", "read_into", "size", "exists", "list", "remove")
KILL_AT_ENV = "DCP_EXT_TEST_KILL_AT"
DEAD_DIR_ENV = "DCP_EXT_TEST_DEAD_DIR"


# -- test backends -------------------------------------------------------------------------

class DownStore(SlowStore):
    """The durable tier is unreachable: each call hangs while the gate exists, then fails; once the
    file named by ``$DCP_EXT_TEST_HEALED`` exists it is an ordinary local directory again."""

    def __getattribute__(self, name):
        healed = os.environ.get(HEALED_ENV)
        if healed and os.path.exists(healed) and name in _STORE_CALLS:
            return getattr(LocalStore, name).__get__(self)
        return super().__getattribute__(name)

    def _down(self, what: str):
        gate = os.environ.get(DOWN_GATE_ENV)
        deadline = time.monotonic() + 600
        while gate and os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise StorageError(f"injected outage: {self.url} is unreachable ({what})")

    def prepare_for_write(self):
        self._down("prepare")

    def open_writer(self, relpath):
        self._down(f"open {relpath}")

    def put_atomic(self, relpath, data):
        self._down(f"put {relpath}")

    def read_into(self, relpath, offset, out):
        self._down(f"read {relpath}")

    def size(self, relpath):
        self._down(f"size {relpath}")

    def exists(self, relpath=""):
        self._down(f"exists {relpath}")

    def list(self):
        self._down("list")

    def remove(self, relpaths):
        self._down("remove")


_KILL = {"armed": False, "ops": 0}
_KILL_LOCK = threading.Lock()


def arm_kill() -> None:
    """From now on, count killfs operations in this process and die at the chosen one."""
    with _KILL_LOCK:
        _KILL["armed"], _KILL["ops"] = True, 0


def die() -> None:
    """Leave a note for the peers, then SIGKILL this process (no cleanup, no atexit)."""
    dead = os.environ.get(DEAD_DIR_ENV)
    if dead:
        open(os.path.join(dead, f"rank{os.environ.get('RANK', '0')}"), "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def _tick() -> None:
    with _KILL_LOCK:
        if not _KILL["armed"]:
            return
        _KILL["ops"] += 1
        hit = _KILL["ops"] >= int(os.environ.get(KILL_AT_ENV, "0") or 10**9)
    if hit:
        die()


class _KillWriter(BlobWriter):
    def __init__(self, inner: BlobWriter):
        self.inner = inner

    def write(self, data) -> int:
        _tick()
        n = self.inner.write(data)
        _tick()
        return n

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> None:
        _tick()
        self.inner.close()
        _tick()

    def abort(self) -> None:
        self.inner.abort()


class KillStore(SlowStore):
    """A local durable directory whose process dies at a chosen operation."""

    def open_writer(self, relpath):
        _tick()
        return _KillWriter(SlowStore.open_writer(self, relpath))

    def put_atomic(self, relpath, data):
        _tick()
        super().put_atomic(relpath, data)
        _tick()

    def remove(self, relpaths):
        _tick()
        super().remove(relpaths)
        _tick()

    def exists(self, relpath=""):
        _tick()
        return super().exists(relpath)

    def list(self):
        _tick()
        return super().list()


def _register() -> None:
    for name, cls in (("downfs", DownStore), ("killfs", KillStore)):
        register_backend(Backend(name, (name,), lambda url, cfg, c=cls: ExtStorageWriter(c(url, cfg), cfg),
                                 lambda url, cfg, c=cls: ExtStorageReader(c(url, cfg), cfg),
                                 description="test backend"), replace=True)


_register()


# -- helpers -------------------------------------------------------------------------------

def node_cache(base: str) -> str:
    """One fake node per rank."""
    return os.path.join(base, f"node{dist.get_rank()}")


def _load(url: str, target: dict, **opts) -> dict:
    with LogCapture() as logs:
        r = dcp_ext.storage_reader(url, **opts)
        dcp.load(target, storage_reader=r)
    return {"tier": str(getattr(r, "tier", None)), "sources": dict(getattr(r, "sources", {})), "logs": logs.lines,
            "values": {k: v.tolist() for k, v in target.items()}}


def _try_load(url: str, target: dict, **opts) -> dict:
    loaded: dict = {}
    try:  # error_text: the reason even where torch 2.9's dcp.load hides it (dcp_ext logs it)
        err = error_text(lambda: loaded.update(_load(url, target, **opts)))
    except AssertionError:  # it loaded
        return loaded
    return {"error": err, "values": {k: v.tolist() for k, v in target.items()}}


# -- defect 1: every rank of a load must agree on the checkpoint ----------------------------

def node_loss_repro(root: str, base: str) -> dict:
    """The issue's reproduction: step A persisted, step B's persistence fails (a memory://
    durable tier is private to each process), node 1's fast tier replaced, then each rank picks
    its own step with tier_status, as docs/async.md used to recommend."""
    r = dist.get_rank()
    cache = node_cache(base)
    tier = {"ranks_per_node": 1, "persist_timeout": 5}
    a, b = f"{root}/step_A", f"memory://{os.path.basename(root)}/step_B"
    w = dcp_ext.storage_writer(a, cache=cache, tier=tier)
    dcp.save({f"x{r}": torch.full((4,), 1.0)}, storage_writer=w)
    w.wait_persisted(120)
    w = dcp_ext.storage_writer(b, cache=cache, tier=tier)
    dcp.save({f"x{r}": torch.full((4,), 2.0)}, storage_writer=w)
    try:
        w.wait_persisted(120)
        b_persisted = True
    except dcp_ext.PersistError:
        b_persisted = False
    dist.barrier()
    if r == 1:
        shutil.rmtree(cache)  # node 1 replaced
    dist.barrier()
    pick = next(u for u in (b, a) if dcp_ext.tier_status(u, cache=cache, tier=tier).loadable)
    out = {"b_persisted": b_persisted, "pick": pick,
           "per_rank_pick": _try_load(pick, {f"x{r}": torch.zeros(4)}, cache=cache, tier=tier)}
    a_dir = fast_dir_for(a, cache)
    out["a_fast_files"] = sorted(os.listdir(a_dir)) if os.path.isdir(a_dir) else []
    dist.barrier()
    # every rank asks for step A: every rank gets A's values
    out["all_a"] = _try_load(a, {f"x{r}": torch.zeros(4)}, cache=cache, tier=tier)
    if os.path.exists(os.path.join(a_dir, ".dcp_ext.json")):
        with open(os.path.join(a_dir, ".dcp_ext.json"), "rb") as f:
            out["a_fast_values_key"] = sorted(i["index"][0] for i in json.loads(f.read())["items"])
    # the collective helper: the same answer everywhere, and it loads
    newest = dcp_ext.newest_loadable([b, a], cache=cache, tier=tier)
    out["newest"] = newest
    out["newest_load"] = _try_load(newest, {f"x{r}": torch.zeros(4)}, cache=cache, tier=tier)
    dist.barrier()
    if r == 0:  # now B cannot be assembled: rank 1's part is gone from every node
        shutil.rmtree(os.path.join(fast_dir_for(b, cache), "replica_of_rank1"))
        shutil.rmtree(os.path.join(fast_dir_for(b, os.path.join(base, "node1")), "replica_of_rank0"),
                      ignore_errors=True)
        os.unlink(os.path.join(fast_dir_for(b, os.path.join(base, "node1")), "__1_0.distcp"))
    dist.barrier()
    newest = dcp_ext.newest_loadable([b, a], cache=cache, tier=tier)
    out["newest_after"] = newest
    out["newest_after_load"] = _try_load(newest, {f"x{r}": torch.zeros(4)}, cache=cache, tier=tier)
    try:
        dcp_ext.newest_loadable([b, a] if r == 0 else [a, b], cache=cache, tier=tier)
    except dcp_ext.CheckpointMismatchError as e:
        out["mismatch"] = str(e)
    return out


# -- defect 2: launched without LOCAL_WORLD_SIZE (srun, mpirun) -------------------------------

def _srun_state(r: int) -> dict:
    return {"shared": torch.arange(16.0), f"x{r}": torch.full((8,), float(r + 1))}


def srun_style(root: str, base: str) -> dict:
    """Two "machines" (a cache each), default tier options, no LOCAL_WORLD_SIZE."""
    r = dist.get_rank()
    assert "LOCAL_WORLD_SIZE" not in os.environ
    cache = node_cache(base)
    url = f"{root}/step"
    w = dcp_ext.storage_writer(url, cache=cache)
    dcp.save(_srun_state(r), storage_writer=w)
    w.wait_persisted(120)
    out = {"replicate": w.replicate, "fast_files": sorted(os.listdir(w.fast_dir))}
    out["intact"] = _try_load(url, {k: torch.zeros_like(v) for k, v in _srun_state(r).items()}, cache=cache)
    dist.barrier()
    for d in os.listdir(w.fast_dir):  # no replicas anywhere: files must travel between the nodes
        if d.startswith("replica_of_rank"):
            shutil.rmtree(os.path.join(w.fast_dir, d))
    dist.barrier()
    out["no_replicas"] = _try_load(url, {k: torch.zeros_like(v) for k, v in _srun_state(r).items()}, cache=cache)
    dist.barrier()
    if r == 1:  # node 1 lost, and nobody else holds its part: only the durable copy is complete
        shutil.rmtree(cache)
    if r == 0:
        shutil.rmtree(os.path.join(w.fast_dir, "replica_of_rank1"), ignore_errors=True)
    dist.barrier()
    out["durable_only"] = _try_load(url, {k: torch.zeros_like(v) for k, v in _srun_state(r).items()}, cache=cache)
    return out


# -- defect 3: an unreachable durable tier ------------------------------------------------------

def durable_outage(root: str, base: str) -> dict:
    """Save while every durable operation hangs; then the outage turns into errors."""
    r = dist.get_rank()
    cache = node_cache(base)
    tier = {"ranks_per_node": 1, "durable_check_timeout": 1}
    url = f"downfs://{root}/step"
    state = {f"x{r}": torch.full((1000,), float(r + 7)), "shared": torch.arange(10.0)}
    with LogCapture() as logs:
        w = dcp_ext.storage_writer(url, cache=cache, tier=tier)
        dcp.save(state, storage_writer=w)  # would hang here if the save waited for the durable tier
    out = {"fast_committed": os.path.exists(os.path.join(w.fast_dir, ".metadata")), "save_logs": logs.lines,
           "pending": len(dcp_ext.pending_persists())}
    dist.barrier()
    if r == 0:
        os.unlink(os.environ[DOWN_GATE_ENV])  # the outage now fails fast instead of hanging
    try:
        w.wait_persisted(300)
        out["persist_error"] = None
    except dcp_ext.PersistError as e:
        out["persist_error"] = str(e)
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    out["load"] = _try_load(url, dict(zeros), cache=cache, tier=tier)
    dist.barrier()
    if r == 1:
        shutil.rmtree(cache)  # node 1 replaced: its data comes back from node 0's replica
    dist.barrier()
    out["after_node1_loss"] = _try_load(url, {k: torch.zeros_like(v) for k, v in state.items()}, cache=cache,
                                        tier=tier)
    out["node_files"] = sorted(os.listdir(w.fast_dir)) if os.path.isdir(w.fast_dir) else []
    dist.barrier()
    if r == 0:
        shutil.rmtree(cache)  # now node 0: only node 1's rebuilt replica of rank 0 is left of its part
    dist.barrier()
    out["after_node0_loss"] = _try_load(url, {k: torch.zeros_like(v) for k, v in state.items()}, cache=cache,
                                        tier=tier)
    dist.barrier()
    if r == 0:
        open(os.environ[HEALED_ENV], "w").close()  # the store is back: finish the persistence now
    dist.barrier()
    out["resume"] = [(str(o.action), o.url) for o in dcp_ext.resume_persists(cache=cache, tier=tier)]
    out["persisted"] = sorted(res.url for res in dcp_ext.wait_persisted(120))
    out["durable_only"] = _try_load(url, {k: torch.zeros_like(v) for k, v in state.items()},
                                    cache=os.path.join(base, f"empty{r}"), tier=tier)
    return out


# -- corrupted copies ---------------------------------------------------------------------------

CORRUPT_TIER = {"ranks_per_node": 1}


def corrupt_save(root: str, base: str) -> dict:
    r = dist.get_rank()
    url = f"{root}/step"
    w = dcp_ext.storage_writer(url, cache=node_cache(base), tier=CORRUPT_TIER, checksum_block_size="4KiB")
    dcp.save(corrupt_state(r), storage_writer=w)
    w.wait_persisted(120)
    return {"fast_dir": w.fast_dir}


def corrupt_state(r: int) -> dict:
    g = torch.Generator().manual_seed(r)
    return {f"x{r}": torch.randn(64, 256, generator=g)}  # 64 KiB: 16 blocks of 4 KiB


def corrupt_load(root: str, base: str) -> dict:
    r = dist.get_rank()
    return _try_load(f"{root}/step", {f"x{r}": torch.zeros(64, 256)}, cache=node_cache(base), tier=CORRUPT_TIER)


def block_offset(fast_dir: str, fqn: str, block: int, block_size: int = 4096) -> int:
    """The file offset of data block ``block`` of ``fqn``'s tensor bytes (from the manifest)."""
    with open(os.path.join(fast_dir, ".dcp_ext.json"), "rb") as f:
        m = decode_manifest(f.read(), fast_dir)
    loc = next(loc for idx, loc in m.locations.items() if idx.fqn == fqn)
    return loc.offset + loc.data_offset + block * block_size


# -- a rank dies during a save ------------------------------------------------------------------

class KillingPlanner(dcp.DefaultSavePlanner):
    """Kills rank ``victim`` (SIGKILL) when it resolves its ``at``-th item: mid-write_data."""

    def __init__(self, victim: int, at: int = 1):
        super().__init__()
        self.victim, self.at, self.n = victim, at, 0

    def resolve_data(self, write_item):
        if dist.get_rank() == self.victim:
            self.n += 1
            if self.n >= self.at:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().resolve_data(write_item)


def _die_state(r: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 10 + r)
    return {f"w{r}": torch.randn(128, 64, generator=g), "shared": torch.arange(32.0) + seed,
            f"v{r}": torch.randn(100, generator=g)}


def save_previous(root: str, base: str, tiered: bool) -> None:
    r = dist.get_rank()
    opts = {"cache": node_cache(base), "tier": {"ranks_per_node": 1}} if tiered else {}
    w = dcp_ext.storage_writer(f"{root}/step_1", **opts)
    dcp.save(_die_state(r, 1), storage_writer=w)
    if tiered:
        w.wait_persisted(120)


def die_mid_save(root: str, base: str, tiered: bool, use_async: bool, victim: int, phase: str, out_dir: str) -> None:
    """Rank ``victim`` dies during the save of step 2 (``phase``: ``write`` = while writing its
    data, ``replicate`` = while sending its replica, ``after_publish`` = right after its node's
    fast commit); the survivors write what they saw."""
    r = dist.get_rank()
    tier = {"ranks_per_node": 1, "exchange_timeout": 15}  # a survivor waits at most this long on us
    opts = {"cache": node_cache(base), "tier": tier} if tiered else {}
    planner = KillingPlanner(victim) if phase == "write" else None
    if phase == "replicate" and r == victim:
        from dcp_ext.tiered import exchange

        real = exchange.FileSource.fill

        def fill_then_die(self, buf):
            real(self, buf)
            os.kill(os.getpid(), signal.SIGKILL)

        exchange.FileSource.fill = fill_then_die
    if phase == "after_publish" and r == victim:  # dies right after its node's fast commit
        from dcp_ext.tiered import writer

        real_publish = writer.publish

        def publish_then_die(store, manifest, metadata):
            real_publish(store, manifest, metadata)
            os.kill(os.getpid(), signal.SIGKILL)

        writer.publish = publish_then_die
    w = dcp_ext.storage_writer(f"{root}/step_2", **opts)
    t0 = time.monotonic()
    try:
        if use_async:
            dcp.async_save(_die_state(r, 2), storage_writer=w, planner=planner).result()
        else:
            dcp.save(_die_state(r, 2), storage_writer=w, planner=planner)
        err = None
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        err = f"{type(e).__name__}: {e}"
    res = {"rank": r, "error": err, "seconds": time.monotonic() - t0,
           "fast_committed": tiered and os.path.exists(os.path.join(w.fast_dir, ".metadata"))}
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(res, f)


def load_after_death(root: str, base: str, tiered: bool) -> dict:
    r = dist.get_rank()
    opts = {"cache": node_cache(base), "tier": {"ranks_per_node": 1}} if tiered else {}
    ref = _die_state(r, 1)
    got = _try_load(f"{root}/step_1", {k: torch.zeros_like(v) for k, v in ref.items()}, **opts)
    got["equal"] = "error" not in got and all(torch.equal(torch.tensor(got["values"][k]), v) for k, v in ref.items())
    ref2 = _die_state(r, 2)
    got["step2"] = _try_load(f"{root}/step_2", {k: torch.zeros_like(v) for k, v in ref2.items()}, **opts)
    got["step2_equal"] = "error" not in got["step2"] and all(
        torch.equal(torch.tensor(got["step2"]["values"][k]), v) for k, v in ref2.items())
    return got


def publish_fails(root: str, base: str, victim: int) -> dict:
    """Rank ``victim``'s node cannot publish its fast commit: the save fails everywhere and no node
    keeps a commit."""
    from dcp_ext.tiered import writer

    r = dist.get_rank()
    real_publish = writer.publish
    if r == victim:
        def refuse(store, manifest, metadata):
            raise StorageError(f"injected: cannot publish in {store.root}")

        writer.publish = refuse
    try:  # the rank process is a shared pool's: the injection must not outlive this test
        w = dcp_ext.storage_writer(f"{root}/step_2", cache=node_cache(base), tier={"ranks_per_node": 1})
        try:
            dcp.save(_die_state(r, 2), storage_writer=w)
            err = None
        except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
            err = f"{type(e).__name__}: {e}"
    finally:
        writer.publish = real_publish
    return {"error": err, "fast_files": sorted(os.listdir(w.fast_dir))}


# -- kill at a random moment of the background persistence --------------------------------------

def kill_state(r: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 10 + r)
    return {f"x{r}": torch.randn(64, 1024, generator=g), "shared": torch.arange(100.0) + seed}


KILL_TIER = {"ranks_per_node": 1, "chunk_size": "64KiB", "persist_timeout": 120}


def save_then_die(root: str, base: str, seed: int) -> None:
    """Save (fast commit), then die at the chosen durable operation of the persistence (or right
    after it, if it finishes first); a rank whose peer died dies too."""
    r = dist.get_rank()
    dead = os.environ[DEAD_DIR_ENV]
    w = dcp_ext.storage_writer(f"killfs://{root}/step_{seed}", cache=node_cache(base), tier=KILL_TIER)
    dcp.save(kill_state(r, seed), storage_writer=w)

    def watch() -> None:
        while True:
            if any(f != f"rank{r}" for f in os.listdir(dead)):
                die()
            time.sleep(0.005)

    arm_kill()
    threading.Thread(target=watch, daemon=True).start()
    try:
        w.wait_persisted(300)
    finally:
        die()


def restart_and_resume(root: str, base: str, seed: int, how: str) -> dict:
    """After the crash: finish the persistence (explicitly, or through the next reader)."""
    r = dist.get_rank()
    cache = node_cache(base)
    url = f"killfs://{root}/step_{seed}"
    if how == "resume":
        outcomes = dcp_ext.resume_persists(cache=cache, tier=KILL_TIER)
        actions = [(o.action, o.reason) for o in outcomes]
    else:
        got = _load(url, {k: torch.zeros_like(v) for k, v in kill_state(r, seed).items()}, cache=cache, tier=KILL_TIER)
        actions = [("loaded", got["tier"])]
    results = dcp_ext.wait_persisted(300)
    return {"actions": actions, "persisted": sorted(res.url for res in results),
            "status": dcp_ext.tier_status(url, cache=cache, tier=KILL_TIER).persist_state}


# -- PROCESS-mode async_save ---------------------------------------------------------------------

def _allow_checkpoint_process() -> None:
    """DCP's checkpoint process is a child of the rank; the harness's ranks are daemonic, which
    multiprocessing forbids to have children (this pool is discarded after the test)."""
    import multiprocessing as mp

    mp.current_process().daemon = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def process_mode(root: str, base: str) -> dict:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    _allow_checkpoint_process()
    r = dist.get_rank()
    cache = node_cache(base)
    tier = {"ranks_per_node": 1}
    out: dict = {"saves": []}
    for step in (1, 2):
        state = {f"x{r}": torch.full((256,), float(10 * step + r)), "shared": torch.arange(8.0) * step}
        w = dcp_ext.storage_writer(f"{root}/step_{step}", cache=cache, tier=tier)
        fut = dcp.async_save(state, storage_writer=w, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        with torch.no_grad():
            state[f"x{r}"].add_(1000)  # the trainer goes on: the checkpoint keeps the values of the call
        fut.result()
        if step == 1:
            res = w.wait_persisted(300)
            out["saves"].append({"url": res.url, "committed_by_this_rank": res.committed_by_this_rank,
                                 "bytes": res.bytes, "persisted_future": w.persisted.result(60).url})
    out["module_wait"] = sorted(res.url for res in dcp_ext.wait_persisted(300))
    out["pending"] = len(dcp_ext.pending_persists())
    for step in (1, 2):
        ref = {f"x{r}": torch.full((256,), float(10 * step + r)), "shared": torch.arange(8.0) * step}
        for where, c in (("fast", cache), ("durable", os.path.join(base, f"empty{r}"))):
            got = _load(f"{root}/step_{step}", {k: torch.zeros_like(v) for k, v in ref.items()}, cache=c, tier=tier)
            out[f"step{step}_{where}"] = {"tier": got["tier"], "equal": all(
                torch.equal(torch.tensor(got["values"][k]), v) for k, v in ref.items())}
    outcomes = os.path.join(cache, ".dcp_ext_outcomes")
    out["outcome_records_left"] = sorted(os.listdir(outcomes)) if os.path.isdir(outcomes) else []
    return out


def process_mode_checkpoint_process_dies(root: str, base: str) -> dict:
    """The checkpoint process (the one persisting) is killed mid-persistence: the trainer's
    wait_persisted says so, and resume_persists in the trainer finishes the durable copy."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from tests.tiered_rank_fns import _gated, _ungate

    _allow_checkpoint_process()
    r = dist.get_rank()
    cache = node_cache(base)
    tier = {"ranks_per_node": 1, "chunk_size": "4KiB"}
    url = f"slowfs://{root}/step"
    state = {f"x{r}": torch.arange(4096.0) + r, "shared": torch.arange(8.0)}
    gate = _gated(base)  # the durable tier gets stuck mid-file, in the checkpoint process too
    dist.barrier()
    w = dcp_ext.storage_writer(url, cache=cache, tier=tier)
    dcp.async_save(state, storage_writer=w, async_checkpointer_type=AsyncCheckpointerType.PROCESS).result()
    h = w._handle
    deadline = time.monotonic() + 300
    while not (h.tracked() and h.pid and h.state.startswith(("copying", "waiting"))):  # persisting, stuck
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    out = {"state_before": h.state, "pending_before": len(dcp_ext.pending_persists())}
    os.kill(h.pid, signal.SIGKILL)
    try:
        w.wait_persisted(120)
        out["error"] = None
    except dcp_ext.PersistError as e:
        out["error"] = str(e)
    dist.barrier()
    _ungate(gate)
    dist.barrier()
    out["status"] = dcp_ext.tier_status(url, cache=cache, tier=tier).persist_state
    out["resume"] = [(o.action, o.url) for o in dcp_ext.resume_persists(cache=cache, tier=tier)]
    out["persisted"] = sorted(res.url for res in dcp_ext.wait_persisted(300))
    got = _load(url, {k: torch.zeros_like(v) for k, v in state.items()}, cache=os.path.join(base, f"empty{r}"))
    out["durable"] = {"tier": got["tier"], "equal": all(torch.equal(torch.tensor(got["values"][k]), v)
                                                        for k, v in state.items())}
    return out
