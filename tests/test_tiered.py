"""Tiered checkpoints: fast-tier commit, background durable persistence, peer replicas,
node-loss restore, crash safety, retention and every bad input a user can make."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    DcpExtError,
    IncompleteCheckpointError,
    PersistError,
    StorageError,
    UnknownBackendError,
)
from dcp_ext.storage.manifest import MANIFEST_NAME, METADATA_NAME
from dcp_ext.tiered import TieredStorageReader, TieredStorageWriter, fast_dir_for, tier_status
from dcp_ext.tiered.choice import Holdings, choose_copy, plan_load_transfers
from dcp_ext.tiered.records import CopyKind, DurableState, DurableView, FastCommit, FileCopy, NodeView, Tier
from dcp_ext.tiered.retention import apply_retention
from dcp_ext.tiered.topology import Topology
from tests import tiered_rank_fns as T
from tests.support.errors import error_text
from tests.support.torch_features import needs_rank_local_save

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "i": torch.arange(seed, seed + 10),
            "nested": {"b": torch.randn(5, generator=g).to(torch.bfloat16)}, "epoch": seed}


def _zeros(s):
    if isinstance(s, torch.Tensor):
        return torch.zeros_like(s)
    if isinstance(s, dict):
        return {k: _zeros(v) for k, v in s.items()}
    return None


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _fast_dirs(cache):
    """The checkpoint directories of a cache root (not its own records, such as the node id)."""
    return sorted(n for n in os.listdir(cache) if not n.startswith("."))


def _load(url, cache, seed=0, **opts):
    dst = _zeros(_state(seed))
    r = dcp_ext.storage_reader(url, cache=cache, **opts)
    dcp.load(dst, storage_reader=r)
    assert _same(_state(seed), dst)
    return r


# -- single process -------------------------------------------------------------------------------

def test_commit_fast_then_persist_and_read_each_tier(tmp_path):
    url, cache = str(tmp_path / "durable" / "step_1"), str(tmp_path / "cache")
    w = dcp_ext.storage_writer(url, cache=cache)
    assert isinstance(w, TieredStorageWriter)
    dcp.save(_state(), storage_writer=w)
    # committed in the fast tier when dcp.save returns
    fd = fast_dir_for(url, cache)
    assert w.fast_dir == fd and os.path.exists(os.path.join(fd, METADATA_NAME))
    res = w.wait_persisted(30)
    assert w.persisted.done() and res.committed_by_this_rank and res.bytes > 0
    assert sorted(os.listdir(url)) == [MANIFEST_NAME, METADATA_NAME, "__0_0.distcp"]  # markers cleaned up
    st = tier_status(url, cache=cache)
    assert st.fast_complete and st.fast_persisted and st.durable_state == "complete"
    assert st.fast_save_id == st.durable_save_id == res.save_id
    # the fast tier is preferred, and the durable copy is standard DCP (stock reader loads it)
    assert _load(url, cache).tier == "fast"
    dst = _zeros(_state())
    dcp.load(dst, storage_reader=dcp.FileSystemReader(url))
    assert _same(_state(), dst)
    shutil.rmtree(cache)  # node replaced: the durable copy is read
    r = _load(url, cache)
    assert r.tier == "durable" and all("durable tier" in s for s in r.sources.values())


def test_config_section_and_env_select_the_tiered_writer(tmp_path, monkeypatch):
    url = str(tmp_path / "d")
    w = dcp_ext.storage_writer(url, config={"tier": {"cache": str(tmp_path / "c"), "keep_last": 3}})
    assert isinstance(w, TieredStorageWriter) and w.config.tier.keep_last == 3
    monkeypatch.setenv("DCP_EXT_TIER_CACHE", str(tmp_path / "c2"))
    assert isinstance(dcp_ext.storage_writer(url), TieredStorageWriter)
    assert isinstance(dcp_ext.storage_reader(url), TieredStorageReader)
    monkeypatch.delenv("DCP_EXT_TIER_CACHE")
    assert not isinstance(dcp_ext.storage_writer(url), TieredStorageWriter)


def test_memory_durable_tier(tmp_path):
    url = f"memory://tiered/{tmp_path.name}/step"
    w = dcp_ext.storage_writer(url, cache=str(tmp_path / "c"))
    dcp.save(_state(3), storage_writer=w)
    w.wait_persisted(30)
    shutil.rmtree(tmp_path / "c")
    assert _load(url, str(tmp_path / "c"), seed=3).tier == "durable"


def test_newest_complete_copy_wins(tmp_path):
    url, cache = str(tmp_path / "d"), str(tmp_path / "c")
    w = dcp_ext.storage_writer(url, cache=cache)
    dcp.save(_state(1), storage_writer=w)
    w.wait_persisted(30)
    # a newer save of the same URL written without the fast tier: the durable copy is newer
    dcp.save(_state(2), storage_writer=dcp_ext.storage_writer(url, overwrite=True))
    r = _load(url, cache, seed=2)
    assert r.tier == "durable"


def test_incomplete_durable_copy_falls_back_to_fast_then_refuses(tmp_path, caplog):
    url, cache = str(tmp_path / "d"), str(tmp_path / "c")
    w = dcp_ext.storage_writer(url, cache=cache)
    dcp.save(_state(), storage_writer=w)
    w.wait_persisted(30)
    os.unlink(os.path.join(url, METADATA_NAME))  # as if the persist had died before its commit
    with caplog.at_level("INFO", logger="dcp_ext.tiered"):
        assert _load(url, cache).tier == "fast"
    assert "the durable copy is incomplete" in caplog.text
    shutil.rmtree(cache)
    with pytest.raises(IncompleteCheckpointError, match=r"durable copy is incomplete \(1 data file\(s\) but no "
                                                        r"\.metadata.*refusing to load"):
        dcp_ext.storage_reader(url, cache=cache).read_metadata()


def test_overwrite_is_refused_in_either_tier(tmp_path):
    url, cache = str(tmp_path / "d"), str(tmp_path / "c")
    w = dcp_ext.storage_writer(url, cache=cache)
    dcp.save(_state(1), storage_writer=w)
    w.wait_persisted(30)
    with pytest.raises(BaseException, match="fast tier .* already holds a complete checkpoint"):
        dcp.save(_state(2), storage_writer=dcp_ext.storage_writer(url, cache=cache))
    shutil.rmtree(cache)
    with pytest.raises(BaseException, match=r"d already holds a complete checkpoint; refusing"):
        dcp.save(_state(2), storage_writer=dcp_ext.storage_writer(url, cache=cache))
    w = dcp_ext.storage_writer(url, cache=cache, overwrite=True)
    dcp.save(_state(2), storage_writer=w)
    w.wait_persisted(30)
    assert _load(url, cache, seed=2).tier == "fast"
    shutil.rmtree(cache)
    assert _load(url, cache, seed=2).tier == "durable"


def test_retention_keeps_last_k_and_never_an_unpersisted_one(tmp_path, caplog):
    cache = str(tmp_path / "c")
    opts = {"cache": cache, "tier": {"keep_last": 1}}
    good0, bad1, good2 = str(tmp_path / "step_0"), f"failfs://{tmp_path}/step_1", str(tmp_path / "step_2")
    w = dcp_ext.storage_writer(good0, **opts)
    dcp.save(_state(0), storage_writer=w)
    w.wait_persisted(30)
    # the durable tier of step 1 is broken: its fast copy is the only one and must survive
    w = dcp_ext.storage_writer(bad1, **opts)
    dcp.save(_state(1), storage_writer=w)
    with pytest.raises(PersistError, match=r"persisting .*__0_0\.distcp to failfs://.*step_1/__0_0\.distcp failed "
                                           r"after 0 of \d+ bytes: StorageError: injected failure"):
        w.wait_persisted(30)
    assert _fast_dirs(cache) == sorted(os.path.basename(fast_dir_for(u, cache)) for u in (good0, bad1))
    w = dcp_ext.storage_writer(good2, **opts)
    dcp.save(_state(2), storage_writer=w)
    with caplog.at_level("INFO", logger="dcp_ext.tiered"):
        w.wait_persisted(120)  # retention has run when the persist future resolves: no sleep needed
    # keep_last=1: step 2 is kept, step 0 (persisted) is removed, step 1 (not persisted) is kept
    assert _fast_dirs(cache) == sorted(os.path.basename(fast_dir_for(u, cache)) for u in (bad1, good2))
    assert "its durable copy is not persisted" in caplog.text
    assert _load(bad1, cache, seed=1).tier == "fast"  # the unpersisted copy is still loadable
    assert _load(good0, cache, seed=0).tier == "durable"
    assert apply_retention(cache, 1) == []


def test_retention_removes_leftovers_of_crashed_saves(tmp_path):
    """A fast-tier directory without a commit (a save that died) is never loaded; retention
    removes it once it is older than the oldest checkpoint it keeps, not before."""
    cache = str(tmp_path / "c")
    old_crash = fast_dir_for(str(tmp_path / "crashed_old"), cache)
    os.makedirs(old_crash)
    with open(os.path.join(old_crash, "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    os.utime(old_crash, (1, 1))  # long ago
    url = str(tmp_path / "step_1")
    w = dcp_ext.storage_writer(url, cache=cache, tier={"keep_last": 1})
    new_crash = fast_dir_for(str(tmp_path / "crashed_new"), cache)
    dcp.save(_state(1), storage_writer=w)
    os.makedirs(new_crash)  # newer than the kept checkpoint: may be a save still being written
    with pytest.raises(CheckpointNotFoundError):
        dcp_ext.storage_reader(str(tmp_path / "crashed_old"), cache=cache).read_metadata()
    w.wait_persisted(120)  # retention ran
    left = _fast_dirs(cache)
    assert os.path.basename(old_crash) not in left
    assert left == sorted([os.path.basename(fast_dir_for(url, cache)), os.path.basename(new_crash)])


# -- bad inputs -------------------------------------------------------------------------------------

def test_cache_dir_not_usable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StorageError, match=r"tier.cache '.*file' is not usable: it exists and is not a directory"):
        dcp_ext.storage_writer(str(tmp_path / "d"), cache=str(f))
    with pytest.raises(StorageError, match=r"tier.cache '.*file/sub' is not usable: cannot create files there"):
        dcp_ext.storage_writer(str(tmp_path / "d"), cache=str(f / "sub"))


def test_durable_url_with_unknown_scheme(tmp_path):
    with pytest.raises(UnknownBackendError, match=r"no backend for URL scheme 'nope' in 'nope://b/x'"):
        dcp_ext.storage_writer("nope://b/x", cache=str(tmp_path))
    with pytest.raises(UnknownBackendError, match="nope"):
        dcp_ext.storage_reader("nope://b/x", cache=str(tmp_path))


@needs_rank_local_save
def test_rank_local_saves_are_refused_with_the_reason(tmp_path):
    w = dcp_ext.storage_writer(str(tmp_path / "d"), cache=str(tmp_path / "c"))
    with pytest.raises(BaseException, match=r"the tiered writer needs use_collectives=True: its fast commit on every "
                                            r"node and the replicas are agreed on by all ranks"):
        dcp.save(_state(), storage_writer=w, use_collectives=False)
    assert not os.path.exists(os.path.join(w.fast_dir, METADATA_NAME))


def test_bad_tier_options(tmp_path):
    with pytest.raises(ConfigError, match=r"tier.keep_last: must be >= 1, got 0"):
        dcp_ext.storage_writer(str(tmp_path), cache=str(tmp_path / "c"), tier={"keep_last": 0})
    with pytest.raises(ConfigError, match=r"unknown option 'tier.bogus'"):
        dcp_ext.storage_writer(str(tmp_path), cache=str(tmp_path / "c"), tier={"bogus": 1})
    with pytest.raises(ConfigError, match=r"tier.chunk_size: must be >= 4096"):
        dcp_ext.storage_writer(str(tmp_path), cache=str(tmp_path / "c"), tier={"chunk_size": 10})


def test_wait_persisted_timeout_and_misuse(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    gate.touch()  # the durable tier is stuck after its first write until the gate is removed
    monkeypatch.setenv(T.GATE_ENV, str(gate))
    url = f"slowfs://{tmp_path}/slow"
    w = dcp_ext.storage_writer(url, cache=str(tmp_path / "c"), tier={"chunk_size": "4KiB"})
    with pytest.raises(DcpExtError, match="no checkpoint has been committed with this writer"):
        w.wait_persisted(1)
    dcp.save(_state(), storage_writer=w)
    h = [p for p in dcp_ext.pending_persists() if p.url == url]
    assert len(h) == 1
    deadline = time.monotonic() + 300
    while not (h[0].state == "copying __0_0.distcp" and h[0].bytes_done == 4096):  # stuck at the 2nd write
        assert time.monotonic() < deadline and not h[0].done(), h[0]
        time.sleep(0.01)
    with pytest.raises(TimeoutError, match=r"slowfs://.*slow \(save [0-9a-f]{8}\) was not persisted to its durable "
                                           r"location within 0.2s on rank 0: copying __0_0.distcp \(4096/\d+ bytes "
                                           r"copied\); call wait_persisted\(\) again"):
        w.wait_persisted(0.2)
    with pytest.raises(TimeoutError, match="was not persisted"):
        dcp_ext.wait_persisted(timeout=0.01)
    gate.unlink()
    assert url in [r.url for r in dcp_ext.wait_persisted(timeout=300)]
    assert dcp_ext.pending_persists() == []


def test_writer_and_reader_pickle_and_the_original_follows_the_copy(tmp_path):
    """What DCP's process executor does: pickle the writer, save with the copy (here in this
    process), and wait on the original; the reader pickles too."""
    import pickle

    url, cache = str(tmp_path / "d"), str(tmp_path / "c")
    w = dcp_ext.storage_writer(url, cache=cache)
    copy = pickle.loads(pickle.dumps(w))
    assert copy.url == url and copy.fast_dir == w.fast_dir and copy is not w
    dcp.save(_state(4), storage_writer=copy)
    res = w.wait_persisted(60)  # the original follows the copy's persistence (its outcome record)
    assert res.url == url and res.committed_by_this_rank and res.bytes > 0
    assert w.persisted.result(60) == res
    assert not os.listdir(os.path.join(cache, ".dcp_ext_outcomes"))  # the record was consumed
    r = pickle.loads(pickle.dumps(dcp_ext.storage_reader(url, cache=cache)))
    dst = _zeros(_state(4))
    dcp.load(dst, storage_reader=r)
    assert r.tier == "fast" and _same(_state(4), dst)
    # (in this test the copy's own handle is in this process too: collect it)
    assert [x.url for x in dcp_ext.wait_persisted(60)] == [url]
    unused = dcp_ext.storage_writer(str(tmp_path / "e"), cache=cache)
    pickle.dumps(unused)  # a copy that never saves: the module-level wait does not wait for it
    assert dcp_ext.pending_persists() == [] and dcp_ext.wait_persisted(5) == []
    with pytest.raises(TimeoutError, match="was not persisted to its durable location within 0.1s"):
        unused.wait_persisted(0.1)  # ... but its own writer says nothing was persisted


def test_persist_logs_progress(tmp_path, monkeypatch, caplog):
    from dcp_ext.tiered import persist

    monkeypatch.setattr(persist, "PROGRESS_EVERY_S", 0.0)  # a line per chunk instead of every 30 s
    url = f"slowfs://{tmp_path}/p"
    w = dcp_ext.storage_writer(url, cache=str(tmp_path / "c"), tier={"chunk_size": "4KiB"})
    with caplog.at_level("INFO", logger="dcp_ext.tiered"):
        dcp.save(_state(), storage_writer=w)
        res = w.wait_persisted(120)
    total = res.bytes / 2**20
    lines = [r.getMessage() for r in caplog.records if ": persisting slowfs://" in r.getMessage()]
    assert len(lines) >= 2 and re.search(rf"rank 0: persisting {re.escape(url)}: 0\.0 of {total:.1f} MiB \(\d+%\)",
                                         lines[0]), lines
    assert lines[-1].endswith("s so far") and "(100%)" in lines[-1], lines


def test_reader_errors_name_what_is_missing(tmp_path):
    url, cache = str(tmp_path / "d"), str(tmp_path / "c")
    with pytest.raises(CheckpointNotFoundError, match="neither the durable location nor the fast tier"):
        dcp_ext.storage_reader(url, cache=cache).read_metadata()
    w = dcp_ext.storage_writer(url, cache=cache)
    dcp.save(_state(), storage_writer=w)
    w.wait_persisted(30)
    os.unlink(os.path.join(url, METADATA_NAME))
    os.unlink(os.path.join(fast_dir_for(url, cache), "__0_0.distcp"))
    with pytest.raises(IncompleteCheckpointError, match=r"fast-tier copy [0-9a-f]{8} lacks __0_0.distcp on every node"):
        dcp_ext.storage_reader(url, cache=cache).read_metadata()


# -- pure decision logic ---------------------------------------------------------------------------

def _view(rank, sid, created, needed, have):
    commit = None if sid is None else FastCommit(sid, created, 2, needed)
    copies = tuple(FileCopy(f, f, size, sid, CopyKind.OWN if kind == "fast tier" else CopyKind.REPLICA)
                   for f, (kind, size) in have.items())
    return NodeView(rank, f"node{rank}", "file:///u", commit, copies)


def test_choose_copy_rules():
    need = {"__0_0.distcp": 10, "__1_0.distcp": 10}
    full = _view(0, "a" * 8, 2.0, need, {"__0_0.distcp": ("fast tier", 10)})
    other = _view(1, "a" * 8, 2.0, need, {"__1_0.distcp": ("fast tier", 10)})
    complete = DurableView(DurableState.COMPLETE, "a" * 8, 2.0)
    assert choose_copy("u", [full, other], complete).tier is Tier.FAST
    assert choose_copy("u", [full, other], complete).durable_same_save
    # a file present on no node: the fast copy is not usable
    d = choose_copy("u", [full, _view(1, None, None, None, {})], complete)
    assert d.tier is Tier.DURABLE and "lacks __1_0.distcp" in d.reason
    # the durable copy is a newer save
    newer = DurableView(DurableState.COMPLETE, "b" * 8, 3.0)
    assert choose_copy("u", [full, other], newer).tier is Tier.DURABLE
    assert choose_copy("u", [full, other], DurableView(DurableState.INCOMPLETE, data_files=2)).tier is Tier.FAST
    # a truncated file does not count
    short = _view(1, "a" * 8, 2.0, need, {"__1_0.distcp": ("fast tier", 9)})
    with pytest.raises(IncompleteCheckpointError, match="lacks __1_0.distcp"):
        choose_copy("u", [full, short], DurableView(DurableState.MISSING))


def test_partner_and_node_rules(monkeypatch, caplog):
    from dcp_ext.config import load_config
    from dcp_ext.tiered.topology import partner_offset, ranks_per_node, replicas_on_own_node

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(None, tier={"cache": "/x"})
    assert ranks_per_node(cfg, 8) == 8 and partner_offset(cfg, 8) == 0  # one node: no partner
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_per_node(cfg, 8) == 4 and partner_offset(cfg, 8) == 4  # same local rank, next node
    assert replicas_on_own_node(cfg, 8) == []
    cfg = load_config(None, tier={"cache": "/x", "ranks_per_node": 2, "replica_offset": 6})
    assert partner_offset(cfg, 8) == 6 and replicas_on_own_node(cfg, 8) == []
    cfg = load_config(None, tier={"cache": "/x", "ranks_per_node": 2, "replica_offset": 1})
    assert replicas_on_own_node(cfg, 4) == [0, 2]  # 0 -> 1 and 2 -> 3 stay on their node
    cfg = load_config(None, tier={"cache": "/x", "ranks_per_node": 4})
    assert replicas_on_own_node(cfg, 6) == [2, 3]  # uneven nodes {0..3}, {4, 5}: 2 -> 0, 3 -> 1


def _holdings(topo, per_node):
    h = Holdings(topo, "s")
    for node, files in per_node.items():
        for name, (size, kind) in files.items():
            h.on(node)[name] = FileCopy(name, name if kind == "fast tier" else f"replica_of_rank{name[2]}/{name}", size,
                                        "s", CopyKind.OWN if kind == "fast tier" else CopyKind.REPLICA,
                                        None if kind == "fast tier" else int(name[2]))
    return h


def test_restore_schedule_one_transfer_per_node_and_file():
    topo = Topology((0, 0, 1, 1), 2)
    have0 = {"__0_0.distcp": (5, "fast tier"), "__2_0.distcp": (7, "replica of rank 2")}
    have1 = {"__1_0.distcp": (5, "fast tier"), "__3_0.distcp": (7, "replica of rank 3")}
    need = {"__0_0.distcp": 5, "__1_0.distcp": 5, "__2_0.distcp": 7, "__3_0.distcp": 7}
    needs = [set(), set(), {"__0_0.distcp", "__2_0.distcp"}, {"__2_0.distcp", "__3_0.distcp"}]
    sched, unavailable = plan_load_transfers(_holdings(topo, {0: have0}), needs, need)
    # one transfer per (node, file): rank 3's __2_0 comes with rank 2's; __3_0 is on no node here
    assert [(t.src, t.dst, t.name, t.size) for t in sched] == [(0, 2, "__0_0.distcp", 5), (0, 2, "__2_0.distcp", 7)]
    assert unavailable == {3: ["__3_0.distcp"]}
    sched, unavailable = plan_load_transfers(_holdings(topo, {0: {**have0, **have1}}), needs, need)
    assert (0, 3, "__3_0.distcp", 7) in [(t.src, t.dst, t.name, t.size) for t in sched] and not unavailable
    # a node's own copy is preferred over a replica; a node never sends to itself
    both = _holdings(Topology((0, 1, 2), 1), {0: {"__1_0.distcp": (5, "replica of rank 1")},
                                              1: {"__1_0.distcp": (5, "fast tier")}})
    sched, _ = plan_load_transfers(both, [set(), set(), {"__1_0.distcp"}], {"__1_0.distcp": 5})
    assert [(t.src, t.dst) for t in sched] == [(1, 2)]
    sched, unavailable = plan_load_transfers(both, [set(), {"__1_0.distcp"}, set()], {"__1_0.distcp": 5})
    assert sched == [] and unavailable == {}


# -- kill -9 during background persistence --------------------------------------------------------

def test_kill_during_persist_then_restart_finds_last_complete(tmp_path, caplog):
    root, cache = str(tmp_path / "ckpt"), str(tmp_path / "cache")
    gate = tmp_path / "durable.gate"
    gate.touch()  # the durable tier of step 2 gets stuck after its first write: killed mid-file
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{T.GATE_ENV: str(gate)})
    p = subprocess.Popen([sys.executable, "-m", "tests.tiered_rank_fns", "killed_saver", root, cache], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "FAST_COMMITTED", p.stderr.read()
        data = os.path.join(root, "step_2", "__0_0.distcp")
        deadline = time.monotonic() + 300
        while not (os.path.exists(data) and os.path.getsize(data) > 0):  # persisting now, and stuck
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        p.kill()  # SIGKILL: no cleanup, no atexit
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(60)
    assert 0 < os.path.getsize(data) < os.path.getsize(os.path.join(fast_dir_for(f"slowfs://{root}/step_2", cache),
                                                                    "__0_0.distcp"))  # a partial durable file
    url2 = f"slowfs://{root}/step_2"
    st = tier_status(url2, cache=cache)
    assert st.fast_complete and not st.fast_persisted and st.durable_state == "incomplete"
    assert st.persist_state == "interrupted" and not st.durable_error
    # restart on a replaced node (an empty fast tier): step 2 is refused, step 1 is the newest complete
    fresh = str(tmp_path / "replaced_node_cache")
    with pytest.raises(IncompleteCheckpointError, match="durable copy is incomplete"):
        dcp_ext.storage_reader(url2, cache=fresh).read_metadata()
    msg = error_text(lambda: dcp.load(_zeros(T.single_state(2)), storage_reader=dcp_ext.storage_reader(url2, cache=fresh)))
    assert re.search("durable copy is incomplete .* refusing to load it", msg), msg
    candidates = [url2, f"{root}/step_1"]
    latest = next(u for u in candidates if tier_status(u, cache=fresh).loadable)
    assert latest == f"{root}/step_1" and dcp_ext.newest_loadable(candidates, cache=fresh) == latest
    dst = _zeros(T.single_state(1))
    r = dcp_ext.storage_reader(latest, cache=fresh)
    dcp.load(dst, storage_reader=r)
    assert r.tier == "durable" and _same(T.single_state(1), dst)
    # restart on the same node: the fast tier has step 2, and the reader finishes persisting it
    assert dcp_ext.newest_loadable(candidates, cache=cache) == url2
    dst = _zeros(T.single_state(2))
    with caplog.at_level("INFO", logger="dcp_ext.tiered"):
        r = dcp_ext.storage_reader(url2, cache=cache)
        dcp.load(dst, storage_reader=r)
        results = dcp_ext.wait_persisted(300)
    assert r.tier == "fast" and _same(T.single_state(2), dst)
    assert "the durable copy is incomplete (a persist did not finish)" in caplog.text
    assert f"resuming the interrupted persistence of {url2}" in caplog.text
    assert url2 in [res.url for res in results]
    st = tier_status(url2, cache=cache)
    assert st.fast_persisted and st.durable_state == "complete" and st.persist_state == "persisted"
    dst = _zeros(T.single_state(2))  # the durable copy alone is complete and exact
    r = dcp_ext.storage_reader(url2, cache=str(tmp_path / "another_node"))
    dcp.load(dst, storage_reader=r)
    assert r.tier == "durable" and _same(T.single_state(2), dst)


# -- multi-rank (4 gloo ranks pretending to be 2 nodes of 2) ----------------------------------------

def test_node_loss_restores_from_partner_replicas(ranks, tmp_path):
    pool = ranks(4)
    url, base = str(tmp_path / "durable"), str(tmp_path / "nodes")
    saved = pool.run(T.save_two_nodes, url, base, 5)
    assert all(s["replicate"] for s in saved)
    # node 1 (ranks 2, 3) holds replicas of ranks 0 and 1, and node 0 of ranks 2 and 3
    assert {"replica_of_rank0", "replica_of_rank1", METADATA_NAME} <= set(saved[2]["fast_files"])
    assert {"replica_of_rank2", "replica_of_rank3", METADATA_NAME} <= set(saved[0]["fast_files"])
    # make the durable data unreadable: any read from it would fail the load
    for f in os.listdir(url):
        if f.endswith(".distcp"):
            os.unlink(os.path.join(url, f))
    loaded = pool.run(T.load_two_nodes, url, base, 5)
    for r, res in enumerate(loaded):
        assert res["tier"] == "fast" and all(res["equal"].values()) and res["step"] == 7, (r, res)
    # node 1's ranks read node 0's files from the replicas they hold
    assert any(re.match(r"replica of rank [01] on this node", s) for s in loaded[2]["sources"].values())
    shutil.rmtree(os.path.join(base, "node1"))  # node 1 replaced: its fast tier is gone
    loaded = pool.run(T.load_two_nodes, url, base, 5)
    for r, res in enumerate(loaded):
        assert res["tier"] == "fast" and all(res["equal"].values()), (r, res)
    src2 = loaded[2]["sources"]
    assert "restored over the process group from rank 0 on node 0 (its replica of rank 2)" in src2["__2_0.distcp"]
    assert any("restored over the process group" in line for line in loaded[2]["logs"])
    assert any(line.startswith("rank 2: read ") and "__2_0.distcp: restored" in line for line in loaded[2]["logs"])
    # node 1's commit was restored too: the next load is local again
    assert os.path.exists(os.path.join(saved[2]["fast_dir"], METADATA_NAME))
    loaded = pool.run(T.load_two_nodes, url, base, 5)
    assert all(all(res["equal"].values()) for res in loaded)
    assert "fast tier on this node" in loaded[2]["sources"]["__2_0.distcp"]


def test_replica_partner_is_configurable(ranks, tmp_path):
    """Four 1-rank "nodes", tier.replica_offset=3: rank r's replica goes to rank r-1 (the
    default would be r+1); a wiped node's data comes back from that partner, durable untouched."""
    pool = ranks(4)
    url, base = str(tmp_path / "durable"), str(tmp_path / "nodes")
    tier = {"ranks_per_node": 1, "replica_offset": 3}
    saved = pool.run(T.save_nodes, url, base, 11, tier)
    for r, res in enumerate(saved):
        assert res["replicate"] and res["replicas"] == [f"replica_of_rank{(r + 1) % 4}"], (r, res)
        assert any(f"replicated 1 file(s) to rank {(r + 3) % 4}" in line for line in res["logs"]), res["logs"]
    for f in os.listdir(url):  # any read of the durable data would now fail the load
        if f.endswith(".distcp"):
            os.unlink(os.path.join(url, f))
    shutil.rmtree(os.path.join(base, "node2"))
    loaded = pool.run(T.load_nodes, url, base, 11, tier)
    for r, res in enumerate(loaded):
        assert res["tier"] == "fast" and all(res["equal"].values()), (r, res)
    assert ("restored over the process group from rank 1 on node 1 (its replica of rank 2)"
            in loaded[2]["sources"]["__2_0.distcp"]), loaded[2]["sources"]
    # a partner on the rank's own node protects nothing against node loss: rank 0 says so
    bad = pool.run(T.save_nodes, str(tmp_path / "d2"), str(tmp_path / "nodes2"), 11,
                   {"ranks_per_node": 2, "replica_offset": 1})
    assert any(re.search(r"replica partner \(r \+ 1\) % 4 of rank\(s\) \[0, 2\] is on the same node "
                         r"\(tier.ranks_per_node=2\).*set tier.replica_offset to a multiple of ranks_per_node", line)
               for line in bad[0]["logs"]), bad[0]["logs"]


def test_one_rank_failing_to_persist_fails_every_rank(ranks, tmp_path):
    """Rank 1's durable writes fail: every rank's persisted future raises (none waits for a
    commit that cannot come), the durable copy is not committed, the fast copy still loads."""
    out = ranks(4).run(T.one_rank_fails_to_persist, str(tmp_path / "d"), str(tmp_path / "nodes"), 13)
    assert re.search(r"PersistError: persisting .*__1_0\.distcp to fail1fs://.*__1_0\.distcp failed: cannot open "
                     r"it for writing: injected failure", out[1]["error"]), out[1]["error"]
    assert re.search(r"PersistError: not committing fail1fs://.*: another rank failed to persist its part "
                     r"\(\.dcp_ext_persist\.[0-9a-f]+\.rank1\.failed\)", out[0]["error"]), out[0]["error"]
    for r in (2, 3):
        assert re.search(r"PersistError: the coordinator did not commit fail1fs://", out[r]["error"]), out[r]["error"]
    assert METADATA_NAME not in os.listdir(tmp_path / "d" / "step")
    for r, res in enumerate(out):
        assert res["fast"]["tier"] == "fast" and all(res["fast"]["equal"].values()), (r, res["fast"])


def test_async_save_holds_values_as_of_the_call(ranks, tmp_path):
    out = ranks(4).run(T.async_save_then_mutate, str(tmp_path / "d"), str(tmp_path / "nodes"), 9)
    for r, res in enumerate(out):
        assert res["fast"]["tier"] == "fast" and all(res["fast"]["equal"].values()), (r, res["fast"])
        assert res["durable"]["tier"] == "durable" and all(res["durable"]["equal"].values()), (r, res["durable"])


def test_back_to_back_saves_with_a_slow_durable_tier(ranks, tmp_path):
    n = 3
    out = ranks(4).run(T.back_to_back, str(tmp_path / "d"), str(tmp_path / "nodes"), n)
    for r, res in enumerate(out):
        # the durable tier was stuck: every save had committed fast and none was durable yet ...
        assert res["pending_after_saves"] == n, res
        for i, ld in enumerate(res["fast_while_stuck"]):
            assert ld["tier"] == "fast" and all(ld["equal"].values()), (r, i, ld)
        # ... then all of them persisted, in both tiers with their own values
        assert len(res["persisted"]) == n, res["persisted"]
        for i, ld in enumerate(res["loads"]):
            assert ld["fast"]["tier"] == "fast" and all(ld["fast"]["equal"].values()), (r, i, ld["fast"])
            assert ld["durable"]["tier"] == "durable" and all(ld["durable"]["equal"].values()), (r, i)
    for i in range(n):
        files = os.listdir(tmp_path / "d" / f"step_{i}")
        assert METADATA_NAME in files and not [f for f in files if f.startswith(".dcp_ext_persist")]


def test_pooled_stager_with_tiers_mutate_in_place(ranks, tmp_path):
    """The whole stack: dcp_ext.async_save + PooledStager into tiered writers, one state
    mutated in place right after each call, durable tier stuck until all saves returned."""
    n = 3
    out = ranks(4).run(T.pooled_back_to_back, str(tmp_path / "d"), str(tmp_path / "nodes"), n)
    for r, res in enumerate(out):
        assert res["pending_after_saves"] == n, res
        assert res["stats"]["pools_allocated"] == 1 and res["stats"]["stages"] == n, res["stats"]
        for i, ld in enumerate(res["loads"]):
            assert ld["fast"]["tier"] == "fast" and all(ld["fast"]["equal"].values()), (r, i, ld["fast"])
            assert ld["durable"]["tier"] == "durable" and all(ld["durable"]["equal"].values()), (r, i, ld)
