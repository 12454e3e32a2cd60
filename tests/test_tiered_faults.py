"""Tiered checkpoints on the days they exist for (issue 13): node loss with ranks that see
different steps, srun-style launches, an unreachable durable tier, corrupted copies, processes
killed during the background persistence (and recovered), ranks killed during a save, and
PROCESS-mode async saves. Every test runs real gloo ranks and compares values exactly."""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.storage.commit import METADATA_NAME
from dcp_ext.testing import RankFailedError, RankPool
from tests import tiered_fault_fns as F
from tests.support.errors import error_text


def _exact(values: dict, ref: dict) -> bool:
    return set(values) == set(ref) and all(torch.equal(torch.tensor(values[k]), v) for k, v in ref.items())


# -- defect 1: ranks that see different steps ------------------------------------------------------

def test_every_rank_loads_the_same_checkpoint_after_node_loss(ranks, tmp_path):
    out = ranks(2).run(F.node_loss_repro, str(tmp_path / "ckpt"), str(tmp_path / "nodes"))
    a, b = f"{tmp_path}/ckpt/step_A", "memory://ckpt/step_B"
    assert not any(o["b_persisted"] for o in out)
    # the per-rank choice: rank 0 sees B (its cache and replica), rank 1 only A ...
    assert [o["pick"] for o in out] == [b, a]
    for r, o in enumerate(out):
        # ... and the load refuses, on every rank, naming what each rank asked for
        err = o["per_rank_pick"].get("error", "")
        assert "the ranks of this load asked for different checkpoints" in err, (r, o["per_rank_pick"])
        assert f"rank(s) [0]: {b}" in err and f"rank(s) [1]: file://{a}" in err and "newest_loadable" in err, err
        assert o["per_rank_pick"]["values"] == {f"x{r}": [0.0] * 4}  # nothing was loaded
    assert out[1]["a_fast_files"] == []  # node 1's fast directory of step A did not get B's files
    for r, o in enumerate(out):  # every rank asks for A: A's values, exactly, on every rank
        assert "error" not in o["all_a"], o["all_a"]
        assert o["all_a"]["values"] == {f"x{r}": [1.0] * 4}, (r, o["all_a"])
    assert out[1]["a_fast_values_key"] == ["x0", "x1"]  # node 1 got A's commit back, not B's
    # the collective helper: the same answer everywhere (B can be assembled from node 0) and it loads
    for r, o in enumerate(out):
        assert o["newest"] == b and o["newest_load"]["values"] == {f"x{r}": [2.0] * 4}, (r, o["newest_load"])
        assert o["newest_load"]["tier"] == "fast"
    for r, o in enumerate(out):  # once rank 1's part of B is gone from every node, A is the newest
        assert o["newest_after"] == a and o["newest_after_load"]["values"] == {f"x{r}": [1.0] * 4}, (r, o)
        assert "newest_loadable call asked for different checkpoints" in o["mismatch"]


# -- defect 2: srun / mpirun launches (no LOCAL_WORLD_SIZE) -----------------------------------------

def test_launch_without_local_world_size(ranks, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    out = ranks(2).run(F.srun_style, str(tmp_path / "ckpt"), str(tmp_path / "nodes"))
    for r, o in enumerate(out):
        ref = F._srun_state(r)
        # the caches tell the two machines apart: replicas go to the other one
        assert o["replicate"] and f"replica_of_rank{1 - r}" in o["fast_files"], o
        for case in ("intact", "no_replicas"):
            assert "error" not in o[case] and _exact(o[case]["values"], ref), (r, case, o[case])
            assert o[case]["tier"] == "fast", (r, case)
        assert "error" not in o["durable_only"] and _exact(o["durable_only"]["values"], ref), (r, o["durable_only"])
        assert o["durable_only"]["tier"] == "durable"
    # without replicas, rank 1 got rank 0's file (the deduplicated "shared") over the process group
    assert "restored over the process group from rank 0 on node 0" in out[1]["no_replicas"]["sources"]["__0_0.distcp"]


# -- defect 3: the durable tier is unreachable -----------------------------------------------------

def test_unreachable_durable_tier_still_commits_fast_and_restores_rebuild_replicas(ranks, tmp_path):
    gate = tmp_path / "outage"
    gate.touch()  # every durable-tier call hangs until the test's ranks open it
    pool = RankPool(2, env={F.DOWN_GATE_ENV: str(gate), F.HEALED_ENV: str(tmp_path / "healed")})
    with pool:
        out = pool.run(F.durable_outage, str(tmp_path / "ckpt"), str(tmp_path / "nodes"), timeout=600)
    for r, o in enumerate(out):
        ref = {f"x{r}": torch.full((1000,), float(r + 7)), "shared": torch.arange(10.0)}
        assert o["fast_committed"] and o["pending"] == 1, o
        assert re.search(r"PersistError|injected outage", o["persist_error"] or ""), o["persist_error"]
        assert "injected outage" in o["persist_error"]
        for case in ("load", "after_node1_loss", "after_node0_loss"):
            assert "error" not in o[case] and _exact(o[case]["values"], ref), (r, case, o[case])
            assert o[case]["tier"] == "fast", (r, case)
        # once the store is back, resume_persists finishes the durable copy (complete, exact)
        assert o["resume"] == [("resumed", f"downfs://{tmp_path}/ckpt/step")] and len(o["persisted"]) == 1, o
        assert o["durable_only"]["tier"] == "durable" and _exact(o["durable_only"]["values"], ref), o["durable_only"]
    assert any("did not answer within 1s (tier.durable_check_timeout): committing to the fast tier anyway" in line
               for line in out[0]["save_logs"]), out[0]["save_logs"]
    # node 1 came back with its own file and the replica it keeps for rank 0 (rebuilt) ...
    assert {"__1_0.distcp", "replica_of_rank0", METADATA_NAME} <= set(out[1]["node_files"]), out[1]["node_files"]
    assert any("rebuilt the replica of rank 0" in line for line in out[1]["after_node1_loss"]["logs"])
    # ... so losing node 0 afterwards costs nothing: rank 0's data comes from that rebuilt replica
    assert "(its replica of rank 0)" in out[0]["after_node0_loss"]["sources"]["__0_0.distcp"]


# -- corrupted fast-tier copies ---------------------------------------------------------------------

def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_copies_fall_back_to_the_next_good_copy(ranks, tmp_path):
    pool = ranks(2)
    root, base = str(tmp_path / "ckpt"), str(tmp_path / "nodes")
    dirs = [d["fast_dir"] for d in pool.run(F.corrupt_save, root, base)]
    own1 = os.path.join(dirs[1], "__1_0.distcp")
    rep1 = os.path.join(dirs[0], "replica_of_rank1", "__1_0.distcp")
    refs = [F.corrupt_state(r) for r in range(2)]

    def load_ok(expect_tier="fast"):
        out = pool.run(F.corrupt_load, root, base)
        for r, o in enumerate(out):
            assert "error" not in o and _exact(o["values"], refs[r]), (r, o)
            assert o["tier"] == expect_tier
        return out

    # the first data block of rank 1's own copy: read from its partner's replica instead
    _flip(own1, F.block_offset(dirs[1], "x1", 0))
    out = load_ok()
    assert any("__1_0.distcp of" in line and "failed its checksums" in line for line in out[1]["logs"]), out[1]["logs"]
    assert "restored over the process group from rank 0 on node 0 (its replica of rank 1)" in out[1]["sources"][
        "__1_0.distcp"]
    assert "fast tier on this node" in load_ok()[1]["sources"]["__1_0.distcp"]  # the bad copy was replaced
    # a block in the middle, and the replica too: the durable copy (the same save) stands in
    _flip(own1, F.block_offset(dirs[1], "x1", 7))
    _flip(rep1, F.block_offset(dirs[1], "x1", 3))
    out = load_ok()
    assert out[1]["sources"]["__1_0.distcp"].startswith("durable tier"), out[1]["sources"]
    assert sum("failed its checksums" in line for line in out[1]["logs"]) == 2, out[1]["logs"]
    # the file read from the durable copy was put back into node 1's fast tier
    assert "fast tier on this node" in load_ok()[1]["sources"]["__1_0.distcp"]
    # rank 0's own copy is corrupt and the durable data is gone: node 1's replica of rank 0 serves
    _flip(os.path.join(dirs[0], "__0_0.distcp"), F.block_offset(dirs[0], "x0", 15))
    for f in os.listdir(root + "/step"):
        if f.endswith(".distcp"):
            os.unlink(os.path.join(root, "step", f))
    out = load_ok()
    assert "(its replica of rank 0)" in out[0]["sources"]["__0_0.distcp"], out[0]["sources"]
    # no good copy anywhere: an error naming the file, never wrong values
    own1 = os.path.join(dirs[1], "__1_0.distcp")
    _flip(own1, F.block_offset(dirs[1], "x1", 1))
    if os.path.exists(os.path.join(dirs[0], "replica_of_rank1", "__1_0.distcp")):
        _flip(os.path.join(dirs[0], "replica_of_rank1", "__1_0.distcp"), F.block_offset(dirs[1], "x1", 1))
    out = pool.run(F.corrupt_load, root, base)
    for o in out:  # the load fails on every rank (a failed load's targets are undefined, as with stock DCP)
        assert "error" in o, o
    assert re.search(r"__1_0\.distcp is missing", out[1]["error"]) and "durable" in out[1]["error"], out[1]["error"]


# -- killed during the background persistence, x10 ------------------------------------------------

def _plain_load(url: str, ref: dict) -> dict | str:
    """The durable copy as a stock-DCP reader sees it (one process, every tensor)."""
    target = {k: torch.zeros_like(v) for k, v in ref.items()}
    try:  # error_text: the reason even where torch 2.9's dcp.load hides it (dcp_ext logs it)
        return error_text(lambda: dcp.load(target, storage_reader=dcp_ext.storage_reader(url), no_dist=True))
    except AssertionError:  # it loaded
        return target


def test_kill_at_random_moments_of_persistence_then_restart(tmp_path):
    rng = random.Random(1313)
    stats = {"committed_before_restart": 0, "refused_before_restart": 0, "wrong": 0, "durable_after": 0}
    for it in range(10):
        root, base, dead = tmp_path / f"ckpt{it}", tmp_path / f"nodes{it}", tmp_path / f"dead{it}"
        dead.mkdir()
        url = f"killfs://{root}/step_{it}"
        env = {F.DEAD_DIR_ENV: str(dead), F.KILL_AT_ENV: str(rng.randint(1, 32))}
        with pytest.raises(RankFailedError):  # every rank dies (SIGKILL) during or right after it
            with RankPool(2, env=env, failure_grace=60) as pool:
                pool.run(F.save_then_die, str(root), str(base), it, timeout=300)
        ref = {**F.kill_state(0, it), **F.kill_state(1, it)}
        got = _plain_load(url, ref)
        if isinstance(got, dict):  # committed: then it must be whole and exact
            stats["committed_before_restart"] += 1
            stats["wrong"] += not all(torch.equal(got[k], v) for k, v in ref.items())
        else:
            stats["refused_before_restart"] += 1
            assert re.search(r"is an incomplete checkpoint|no checkpoint at", got), got
        how = "resume" if it % 2 == 0 else "load"
        if it >= 8:  # node 1 is replaced too: its part comes from node 0's replica
            shutil.rmtree(base / "node1")
        with RankPool(2) as pool:
            res = pool.run(F.restart_and_resume, str(root), str(base), it, how, timeout=300)
        assert res[0]["status"] == "persisted" and res[1]["status"] == ("persisted" if it < 8 or how == "load"
                                                                         else "none"), res
        got = _plain_load(url, ref)
        assert isinstance(got, dict), got
        stats["durable_after"] += all(torch.equal(got[k], v) for k, v in ref.items())
        names = os.listdir(root / f"step_{it}")
        assert not [n for n in names if n.startswith(".dcp_ext_persist")], names  # markers cleaned up
    print("kill-during-persist stats:", stats)
    assert stats["wrong"] == 0 and stats["durable_after"] == 10, stats
    assert stats["refused_before_restart"] > 0, stats  # the kills did interrupt persistences


# -- one rank dies mid-save ---------------------------------------------------------------------------

@pytest.mark.parametrize("tiered,use_async,world,victim,phase", [
    (False, False, 3, 1, "write"),
    (False, True, 2, 0, "write"),
    (True, False, 4, 2, "write"),
    (True, True, 2, 1, "write"),
    (True, False, 3, 0, "replicate"),
    (True, False, 2, 1, "after_publish"),
])
def test_a_rank_killed_mid_save_fails_the_others_and_commits_nothing(tmp_path, tiered, use_async, world, victim,
                                                                     phase):
    root, base, out_dir = str(tmp_path / "ckpt"), str(tmp_path / "nodes"), tmp_path / "out"
    out_dir.mkdir()
    # timeouts that bound how long a survivor may wait: DCP's collectives run on the default group
    # (its timeout), ours on side groups (tier.exchange_timeout=15 in die_mid_save)
    with RankPool(world, pg_timeout=20, failure_grace=120) as pool:
        pool.run(F.save_previous, root, base, tiered)
        with pytest.raises(RankFailedError) as ei:
            pool.run(F.die_mid_save, root, base, tiered, use_async, victim, phase, str(out_dir), timeout=300)
    assert list(ei.value.failures) == [victim], ei.value.failures
    for r in range(world):
        if r == victim:
            continue
        res = json.loads((out_dir / f"rank{r}.json").read_text())
        assert res["error"] is not None, res  # every survivor raised (none hangs)
        # gloo notices a dead peer at once, or the survivor's timeout runs out (the longest wait)
        assert re.search(r"Connection closed by peer|Connection reset|tiered exchange .* failed|Timed out waiting",
                         res["error"]), res
        assert not res["fast_committed"], res  # a survivor's node withdraws (or never made) its commit
    assert not os.path.exists(os.path.join(root, "step_2", METADATA_NAME))
    with RankPool(world) as pool:
        loaded = pool.run(F.load_after_death, root, base, tiered)
    for r, o in enumerate(loaded):
        assert o["equal"], (r, o)  # the previous checkpoint, exactly
        if phase == "after_publish":
            # the victim's node kept its commit of a save whose every part was written and
            # replicated: step 2 is whole, and loads exactly (from that node and the replicas)
            assert o["step2_equal"] and o["step2"]["tier"] == "fast", (r, o["step2"])
        else:
            assert re.search(r"is an incomplete checkpoint|no checkpoint at", o["step2"]["error"]), o


def test_a_node_that_cannot_publish_its_fast_commit_fails_the_save_everywhere(ranks, tmp_path):
    root, base = str(tmp_path / "ckpt"), str(tmp_path / "nodes")
    pool = ranks(2)
    pool.run(F.save_previous, root, base, True)
    out = pool.run(F.publish_fails, root, base, 1)
    for r, o in enumerate(out):
        assert "a node could not publish its commit (rank 1: StorageError: injected: cannot publish" in (o["error"] or
                                                                                                         ""), o
        assert "the commit was withdrawn from every node" in o["error"]
        assert METADATA_NAME not in o["fast_files"], o
    for r, o in enumerate(pool.run(F.load_after_death, root, base, True)):
        assert o["equal"], (r, o)
        assert re.search(r"is an incomplete checkpoint|no checkpoint at", o["step2"]["error"]), o


# -- PROCESS-mode async_save --------------------------------------------------------------------------

def test_process_mode_async_save_with_the_tiered_writer(tmp_path):
    with RankPool(2) as pool:
        out = pool.run(F.process_mode, str(tmp_path / "ckpt"), str(tmp_path / "nodes"), timeout=600)
    for r, o in enumerate(out):
        s1 = o["saves"][0]
        assert s1["url"] == f"{tmp_path}/ckpt/step_1" and s1["bytes"] > 0 and s1["committed_by_this_rank"] == (r == 0)
        assert s1["persisted_future"] == s1["url"]
        assert o["module_wait"] == [f"{tmp_path}/ckpt/step_2"] and o["pending"] == 0, o
        for step in (1, 2):
            assert o[f"step{step}_fast"] == {"tier": "fast", "equal": True}, (r, step, o)
            assert o[f"step{step}_durable"] == {"tier": "durable", "equal": True}, (r, step, o)
        assert o["outcome_records_left"] == [], o


def test_process_mode_checkpoint_process_killed_mid_persistence(tmp_path):
    with RankPool(2) as pool:
        out = pool.run(F.process_mode_checkpoint_process_dies, str(tmp_path / "ckpt"), str(tmp_path / "nodes"),
                       timeout=600)
    url = f"slowfs://{tmp_path}/ckpt/step"
    for r, o in enumerate(out):
        assert o["pending_before"] == 1 and o["state_before"].startswith(("copying", "waiting")), o
        assert re.search(rf"the checkpoint process \(pid \d+\) persisting {re.escape(url)} \(save [0-9a-f]{{8}}\) on "
                         rf"rank {r} died while it was .*resume_persists\(\)", o["error"] or ""), o["error"]
        assert o["status"] == "interrupted", o
        assert o["resume"] == [("resumed", url)] and o["persisted"] == [url], o
        assert o["durable"] == {"tier": "durable", "equal": True}, o
