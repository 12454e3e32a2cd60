"""dcp_ext.CheckpointManager: interval, retention, latest pointer, records, resume, backends, ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import (CheckpointExistsError, CheckpointNotFoundError, ConfigError, DcpExtError,
                            IncompleteCheckpointError)
from dcp_ext.manager import CheckpointRoot, RetentionPolicy, StepRecord, steps_to_delete
from dcp_ext.storage.commit import LATEST_NAME, STEP_INFO_NAME
from tests import manager_rank_fns as M

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# -- retention policy (pure) ------------------------------------------------------------------

def _recs(*steps, owned=True, metrics=None):
    return [StepRecord(s, owned, (metrics or {}).get(s)) for s in steps]


def test_retention_keep_last_every_and_union():
    recs = _recs(10, 20, 30, 40, 50, 60)
    assert steps_to_delete(recs, RetentionPolicy(keep_last=2)) == [10, 20, 30, 40]
    assert steps_to_delete(recs, RetentionPolicy(keep_every=20)) == [10, 30, 50]  # 60 is the newest
    assert steps_to_delete(recs, RetentionPolicy(keep_last=1, keep_every=30)) == [10, 20, 40, 50]
    assert steps_to_delete(recs, RetentionPolicy()) == []  # no rule: keep everything


def test_retention_keep_best_min_max_and_missing_metrics():
    m = {10: {"loss": 3.0}, 20: {"loss": 1.0}, 30: {"loss": 2.0}, 40: {"acc": 0.5}, 50: {"loss": float("nan")},
         60: {"loss": 5.0}}
    recs = _recs(10, 20, 30, 40, 50, 60, metrics=m)
    # best 2 by min loss: 20, 30; 40 and 50 have no usable loss: kept; 60 is the newest
    assert steps_to_delete(recs, RetentionPolicy(keep_best=2, best_metric="loss")) == [10]
    # best 1 by max loss is 60 (also the newest)
    assert steps_to_delete(recs, RetentionPolicy(keep_best=1, best_metric="loss", best_mode="max")) == [10, 20, 30]
    # equal metrics: the newer step wins
    tie = _recs(1, 2, 3, metrics={1: {"l": 1.0}, 2: {"l": 1.0}, 3: {"l": 9.0}})
    assert steps_to_delete(tie, RetentionPolicy(keep_best=1, best_metric="l")) == [1]


def test_retention_never_deletes_protected_foreign_or_newest():
    recs = _recs(1, 2, 3) + _recs(4, owned=False) + _recs(5)
    assert steps_to_delete(recs, RetentionPolicy(keep_last=1), protected={2}) == [1, 3]
    assert steps_to_delete(_recs(7), RetentionPolicy(keep_last=1)) == []
    # the newest step is kept even if no rule keeps it
    assert steps_to_delete(_recs(1, 2, metrics={1: {"l": 0.0}, 2: {"l": 9.0}}),
                           RetentionPolicy(keep_best=1, best_metric="l")) == []


# -- configuration ----------------------------------------------------------------------------

def test_manager_config_sources_and_precedence(tmp_path, monkeypatch):
    f = tmp_path / "ckpt.toml"
    f.write_text('[manager]\ninterval = 50\nkeep_last = 4\nexclude = ["data_loader"]\n'
                 'save_on_signal = ["SIGUSR1"]\nexit_on_signal = false\n')
    monkeypatch.setenv("DCP_EXT_MANAGER_KEEP_LAST", "7")
    mgr = dcp_ext.CheckpointManager(tmp_path / "run", config=str(f), interval=25)
    try:
        o = mgr.options
        assert (o.interval, o.keep_last, o.exclude, o.save_on_signal, o.exit_on_signal) == \
            (25, 7, ["data_loader"], ["SIGUSR1"], False)
    finally:
        mgr.close()
    monkeypatch.setenv("DCP_EXT_MANAGER_EXCLUDE", "a, b")
    assert dcp_ext.load_config().manager.exclude == ["a", "b"]


@pytest.mark.parametrize("opts,msg", [
    ({"interval": 0}, "manager.interval: must be >= 1, got 0"),
    ({"keep_last": 0}, "manager.keep_last: must be >= 1"),
    ({"keep_best": 2}, "manager.keep_best needs manager.best_metric"),
    ({"best_mode": "lowest"}, "manager.best_mode: must be 'min' or 'max'"),
    ({"save_on_signal": ["SIGNOPE"]}, "'SIGNOPE' is not a signal of this platform"),
    ({"save_on_signal": ["SIGKILL"]}, "SIGKILL cannot be caught"),
    ({"manager": {"step_prefix": "a/b"}}, "manager.step_prefix: must be a non-empty name without '/'"),
    ({"manager": {"keep_lats": 2}}, "unknown option 'manager.keep_lats'"),
])
def test_manager_bad_options(tmp_path, opts, msg):
    with pytest.raises(DcpExtError) as ei:
        dcp_ext.CheckpointManager(tmp_path, **opts)
    assert msg in str(ei.value)


# -- one process ------------------------------------------------------------------------------

def _state(step: int) -> dict:
    return M.expected_state(step, 0)


def test_interval_force_latest_pointer_and_records(tmp_path):
    root = tmp_path / "run"
    with dcp_ext.CheckpointManager(root, interval=3) as mgr:
        saved = [s for s in range(1, 8) if mgr.save(s, _state(s), metrics={"loss": torch.tensor(1.0 / s)},
                                                  metadata={"lr": 0.1})]
        assert saved == [3, 6]
        assert mgr.save(7, _state(7), force=True)
        assert mgr.all_steps() == [3, 6, 7] and mgr.latest_step() == 7
    assert (root / LATEST_NAME).read_text() == "step_7\n"
    # the shell one-liner the docs give
    out = subprocess.run(["sh", "-c", f'cat "{root}/latest"'], capture_output=True, text=True).stdout.strip()
    assert out == "step_7" and (root / out / ".metadata").exists()
    rec = json.loads((root / "step_6" / STEP_INFO_NAME).read_text())
    assert rec["step"] == 6 and rec["metrics"] == {"loss": pytest.approx(1 / 6)} and rec["metadata"]["lr"] == 0.1
    assert rec["created"] <= rec["committed"] and rec["world_size"] == 1 and rec["mode"] == "sync"
    # a manager checkpoint is a standard DCP checkpoint: stock reader + planner load it
    got = {"shared": torch.zeros(1024), "own0": torch.zeros(4096), "step": 0}
    dcp.load(got, storage_reader=dcp.FileSystemReader(str(root / "step_6")))
    assert torch.equal(got["own0"], _state(6)["own0"]) and got["step"] == 6


def test_existing_step_is_skipped_or_refused_or_overwritten(tmp_path, caplog):
    with dcp_ext.CheckpointManager(tmp_path) as mgr:
        assert mgr.save(1, _state(1))
    with dcp_ext.CheckpointManager(tmp_path) as mgr, caplog.at_level(logging.WARNING):
        assert not mgr.save(1, _state(2))
        assert "step 1 already has a complete checkpoint" in caplog.text
        with pytest.raises(CheckpointExistsError, match="Checkpoint already exists: step 1 .*overwrite=True"):
            mgr.save(1, _state(2), force=True)
    with dcp_ext.CheckpointManager(tmp_path, overwrite=True) as mgr:
        assert mgr.save(1, _state(2), force=True)
        got = M._blank(0)
        assert mgr.load(got) == 1 and torch.equal(got["own0"], _state(2)["own0"])


def test_resume_returns_step_and_respects_exclude(tmp_path):
    with dcp_ext.CheckpointManager(tmp_path) as mgr:
        assert mgr.load(M._blank(0)) is None  # fresh run
        mgr.save(5, _state(5))
        mgr.save(9, _state(9))
    with dcp_ext.CheckpointManager(tmp_path, exclude=["shared"]) as mgr:
        got = M._blank(0)
        got["shared"].fill_(-1)
        assert mgr.load(got) == 9
        assert torch.equal(got["own0"], _state(9)["own0"]) and got["step"] == 9
        assert torch.equal(got["shared"], torch.full((1024,), -1.0))  # left untouched
        got = M._blank(0)
        assert mgr.load(got, 5) == 5 and got["step"] == 5
        with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint for step 6 .*complete steps: 5, 9"):
            mgr.load(M._blank(0), 6)
        with pytest.raises(ConfigError, match=r"manager.exclude names \['shared'\], which the state does not"):
            mgr.load({"own0": torch.zeros(4096)})


def test_retention_and_leftovers_only_touch_what_the_manager_created(tmp_path):
    root = tmp_path / "run"
    # a checkpoint someone saved by hand in the manager's naming scheme: never deleted
    dcp.save({"x": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(str(root / "step_0")))
    # an incomplete directory that is not the manager's: never deleted
    (root / "step_1").mkdir()
    (root / "step_1" / "__0_0.distcp").write_bytes(b"partial")
    # unrelated files in the root: never touched
    (root / "notes.txt").write_text("mine")
    with dcp_ext.CheckpointManager(root, keep_last=2) as mgr:
        for s in range(2, 7):
            mgr.save(s, _state(s))
        assert mgr.all_steps() == [0, 5, 6]
    assert sorted(os.listdir(root)) == ["latest", "notes.txt", "step_0", "step_1", "step_5", "step_6"]


def test_leftovers_of_crashed_saves_are_removed_at_start(tmp_path):
    root = tmp_path / "run"
    with dcp_ext.CheckpointManager(root) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    # step 2 "crashed": metadata gone, data left behind (its step record marks it as the manager's)
    os.remove(root / "step_2" / ".metadata")
    with pytest.raises(IncompleteCheckpointError, match="step 2 under .* is incomplete"):
        with dcp_ext.CheckpointManager(root, cleanup=False) as mgr:
            mgr.load(M._blank(0), 2)
    with dcp_ext.CheckpointManager(root) as mgr:
        assert not (root / "step_2").exists()
        assert mgr.latest_step() == 1
        got = M._blank(0)
        assert mgr.load(got) == 1 and torch.equal(got["own0"], _state(1)["own0"])
    # a leftover whose writer is still alive on this host is left alone
    with dcp_ext.CheckpointManager(root) as mgr:
        mgr.save(3, _state(3))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = json.loads((root / "step_3" / STEP_INFO_NAME).read_text())
        rec["pid"] = child.pid
        (root / "step_3" / STEP_INFO_NAME).write_text(json.dumps(rec))
        os.remove(root / "step_3" / ".metadata")
        dcp_ext.CheckpointManager(root).close()
        assert (root / "step_3" / "__0_0.distcp").exists()
    finally:
        child.kill()
        child.wait()
    dcp_ext.CheckpointManager(root).close()
    assert not (root / "step_3").exists()


def test_keep_best_by_metric(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 3.0, 6: 9.0}
    with dcp_ext.CheckpointManager(tmp_path, keep_best=2, best_metric="loss") as mgr:
        for s, loss in losses.items():
            mgr.save(s, _state(s), metrics={"loss": loss})
        assert mgr.all_steps() == [2, 4, 6]  # the 2 best, and the newest
        assert mgr.info(2).metrics == {"loss": 1.0}


def test_record_layout_from_reshard_planner(tmp_path):
    layout = dcp_ext.ParallelLayout()
    with dcp_ext.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(4)}, planner=dcp_ext.ReshardSavePlanner(layout))
        assert mgr.info(1).layout == layout.describe()


def test_bad_metrics_and_steps_are_clear_errors(tmp_path):
    with dcp_ext.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(DcpExtError, match=r"metrics\['x'\]: object cannot be stored as JSON"):
            mgr.save(1, _state(1), metrics={"x": object()})
        with pytest.raises(DcpExtError, match="step must be an int >= 0, got -1"):
            mgr.save(-1, _state(1))
    with pytest.raises(DcpExtError, match="is closed"):
        mgr.save(2, _state(2))


# -- backends ---------------------------------------------------------------------------------

def _backend_roundtrip(root: str, opts: dict) -> None:
    with dcp_ext.CheckpointManager(root, interval=2, keep_last=2, async_save=True, **opts) as mgr:
        for s in range(1, 8):
            mgr.save(s, _state(s), metrics={"loss": float(s)})
        mgr.wait()
        assert mgr.all_steps() == [4, 6]
        got = M._blank(0)
        assert mgr.load(got) == 6 and M._equal(got, _state(6))
    r = CheckpointRoot(root, dcp_ext.load_config(**opts))
    assert r.read_latest() == "step_6"
    assert [(e.step, e.committed, e.owned) for e in r.scan()] == [(4, True, True), (6, True, True)]
    r.close()


def test_manager_on_fsspec_memory():
    import uuid

    _backend_roundtrip(f"memory://mgr-{uuid.uuid4().hex[:8]}/run", {})


@pytest.mark.s3
def test_manager_on_s3(s3_server):
    import uuid

    _backend_roundtrip(f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:10]}/run",
                       s3_server.options(part_size="5MiB"))


@pytest.mark.gcs
def test_manager_on_gcs(gcs_server):
    import uuid

    _backend_roundtrip(f"gs://{gcs_server.bucket}/{uuid.uuid4().hex[:10]}/run", gcs_server.options())


# -- ranks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_two_ranks_save_retain_and_resume(ranks, tmp_path, async_save):
    kw = {"interval": 2, "keep_last": 2, "async_save": async_save}
    res = ranks(2).run(M.train_save_load, str(tmp_path / "run"), 7, kw, {}, timeout=300)
    for r in res:
        assert r["saved"] == [2, 4, 6] and r["steps"] == [4, 6] and r["latest"] == 6
        assert r["loaded"] == 6 and r["exact"] and r["metrics"] == {"loss": 94.0} and r["world"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step_4", "step_6"]
    again = ranks(2).run(M.load_step, str(tmp_path / "run"), 4, {}, {})
    assert all(r == {"loaded": 4, "exact": True} for r in again)


def test_two_ranks_tiered(ranks, tmp_path):
    kw = {"interval": 3, "keep_last": 1, "async_save": True}
    opts = {"cache": str(tmp_path / "cache"), "tier": {"ranks_per_node": 2}}
    res = ranks(2).run(M.train_save_load, str(tmp_path / "run"), 6, kw, opts, timeout=300)
    for r in res:
        assert r["saved"] == [3, 6] and r["steps"] == [6] and r["loaded"] == 6 and r["exact"]
    # the durable copy is a standard checkpoint
    got = {"shared": torch.zeros(1024), "step": 0}
    dcp.load(got, storage_reader=dcp.FileSystemReader(str(tmp_path / "run" / "step_6")))
    assert got["step"] == 6 and torch.equal(got["shared"], torch.full((1024,), 6.0))
    # as if a crash had interrupted step 6's persistence: its durable copy is incomplete, its fast
    # copy complete; a restarted manager resumes from it (newest_loadable), exactly
    os.remove(tmp_path / "run" / "step_6" / ".metadata")
    res = ranks(2).run(M.load_step, str(tmp_path / "run"), None, {}, opts, timeout=300)
    assert all(r == {"loaded": 6, "exact": True} for r in res), res
    assert (tmp_path / "run" / "step_6").exists()  # not removed as a leftover: its fast copy is complete


@pytest.mark.parametrize("async_save", [False, True])
def test_close_frees_the_managers_process_groups(ranks, tmp_path, async_save):
    # freed by close() through their backends (destroy_process_groups), not left to whoever drops
    # the manager: on torch 2.7 that froze rank 0 in ~ProcessGroupGloo
    kw = {"interval": 1, "async_save": async_save}
    res = ranks(2).run(M.groups_freed_at_close, str(tmp_path / "run"), kw, timeout=300)
    assert all(r["loaded"] == 1 and r["exact"] for r in res), res
    assert all(r["alive"][0] is False for r in res), res  # the group of the manager's decisions
    if not async_save:  # (async: DCP's upload thread may hold the save group a moment longer)
        assert all(r["alive"][1] is False for r in res), res


def test_freeing_a_group_with_a_collective_in_flight_does_not_hang(ranks):
    res = ranks(2).run(M.free_group_with_a_collective_in_flight, timeout=120)
    assert res == [{"gathered": None, "parked": 0}, {"gathered": [[1.0] * 4, [2.0] * 4], "parked": 0}], res


def test_rank0_bookkeeping_errors_reach_every_rank(ranks, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "step_2").write_text("a file where the step directory should be")
    res = ranks(2).run(M.save_into_a_blocked_step, str(root), timeout=120)
    assert res[0] == res[1] and res[0] != "saved", res


def test_async_failure_surfaces_at_next_save_and_leftover_is_removed(tmp_path, monkeypatch):
    from dcp_ext.storage.writer import ExtStorageWriter

    real = ExtStorageWriter.write_data

    def flaky(self, plan, planner):
        if self.store.url.endswith("step_4"):
            raise OSError("disk on fire")
        return real(self, plan, planner)

    monkeypatch.setattr(ExtStorageWriter, "write_data", flaky)
    root = tmp_path / "run"
    with dcp_ext.CheckpointManager(root, interval=2, async_save=True) as mgr:
        assert mgr.save(2, _state(2)) and mgr.save(4, _state(4))  # step 4 fails in the background
        failed = mgr._pending[-1]
        assert failed.step == 4 and failed.done.wait(60)  # its failure was recorded before the next save
        with pytest.raises(BaseException, match="disk on fire"):
            mgr.save(6, _state(6))
        assert mgr.save(6, _state(6))
        mgr.wait()
        assert mgr.all_steps() == [2, 6]
    assert not (root / "step_4").exists()  # the failed save's leftovers were removed
    assert (root / "latest").read_text() == "step_6\n"


def test_signal_in_one_process(tmp_path):
    import signal

    with dcp_ext.CheckpointManager(tmp_path, interval=100, save_on_signal=["SIGUSR1"], exit_on_signal=False) as mgr:
        assert not mgr.maybe_save(1, _state(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.maybe_save(2, _state(2)) and mgr.preempted == signal.SIGUSR1
        assert mgr.all_steps() == [2]
    mgr = dcp_ext.CheckpointManager(tmp_path / "b", interval=100, save_on_signal=[signal.SIGUSR1])
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit) as ei:
        mgr.maybe_save(3, _state(3))
    assert ei.value.code == 128 + signal.SIGUSR1
    assert (tmp_path / "b" / "step_3" / ".metadata").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored on exit


def test_manager_on_tensorstore(tmp_path):
    pytest.importorskip("tensorstore")
    from dcp_ext.verify import inspect_checkpoint

    for root, opts in ((f"zarr3+file://{tmp_path}/a", {}), (str(tmp_path / "b"), {"backend": "tensorstore"})):
        _backend_roundtrip(root, opts)
        assert inspect_checkpoint(f"{root}/step_6", **opts)["layout"] == "zarr3"
    # conversions find the zarr3 format behind a plain path
    rep = dcp_ext.export_checkpoint(str(tmp_path / "b" / "step_6"), str(tmp_path / "w.safetensors"))
    assert rep.tensors == 2


def test_a_step_being_claimed_is_never_pruned_as_a_leftover(tmp_path, monkeypatch):
    """A retention pass (in an upload's callback thread) that runs while save() writes the next
    step's record must not take that step for a leftover of a dead save (seen on GCS)."""
    import threading

    real, real_delete = CheckpointRoot.write_info, CheckpointRoot.delete
    passes = []

    def slow_delete(self, name):  # a deletion that takes long: it lands after step 2 committed
        if name == "step_2":
            for _ in range(600):
                if (tmp_path / "step_2" / ".metadata").exists():
                    break
                time.sleep(0.05)
        real_delete(self, name)

    def write_info_then_prune(self, name, info):
        real(self, name, info)
        if info.committed is None and name == "step_2":  # the record of a save that is starting
            t = threading.Thread(target=mgr._prune)  # a concurrent pass, as after another commit
            t.start()
            t.join(1.0)  # (with the fix it waits for the claim to finish)
            passes.append(t)

    with dcp_ext.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        monkeypatch.setattr(CheckpointRoot, "write_info", write_info_then_prune)
        monkeypatch.setattr(CheckpointRoot, "delete", slow_delete)
        assert mgr.save(2, _state(2))
        for t in passes:
            t.join(60)
        assert mgr.all_steps() == [2]
    got = M._blank(0)
    with dcp_ext.CheckpointManager(tmp_path) as mgr:
        assert mgr.load(got) == 2 and M._equal(got, _state(2))
