"""The commit protocol module (dcp_ext.storage.commit): names, states, errors, order of operations.

Run on the local store and on fsspec's memory store (an object-store-like backend)."""

from __future__ import annotations

import uuid

import pytest

from dcp_ext.config import load_config
from dcp_ext.errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError
from dcp_ext.storage import commit as C
from dcp_ext.storage.fs import LocalStore
from dcp_ext.storage.fsspec import FsspecStore


@pytest.fixture(params=["fs", "memory"])
def store(request, tmp_path):
    cfg = load_config()
    if request.param == "fs":
        return LocalStore(str(tmp_path / "ckpt"), cfg)
    return FsspecStore(f"memory://commit-{uuid.uuid4().hex}/ckpt", cfg)


def _put(store, name, data=b"x"):
    w = store.open_writer(name)
    w.write(data)
    w.close()


def test_names():
    assert C.data_file_name(3, 7) == "__3_7.distcp"
    assert C.data_file_rank("__12_0.distcp") == 12
    assert C.data_file_rank("sub/__2_1.distcp") == 2
    assert C.data_file_rank("__2_1.distcp.part") is None and not C.is_data_file(".metadata")
    assert C.replica_dir_rank(C.replica_dir_name(5)) == 5 and C.replica_dir_rank("replica_of_rankx") is None
    assert C.persist_marker("abc", "rank1.json").startswith(C.persist_marker_prefix("abc"))


def test_states_and_errors(store):
    if isinstance(store, LocalStore):  # object stores have no "missing" prefix distinct from "empty"
        assert C.commit_status(store).state is C.CommitState.MISSING
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*: the location does not exist"):
            C.require_committed(store)
    store.prepare_for_write()
    if isinstance(store, LocalStore):
        assert C.commit_status(store).state is C.CommitState.EMPTY
        with pytest.raises(CheckpointNotFoundError, match="the location is empty"):
            C.require_committed(store)
    _put(store, "__0_0.distcp")
    _put(store, "__1_0.distcp")
    _put(store, C.MANIFEST_NAME, b"{}")
    st = C.commit_status(store)
    assert st.state is C.CommitState.INCOMPLETE and sorted(st.data_files) == ["__0_0.distcp", "__1_0.distcp"]
    with pytest.raises(IncompleteCheckpointError, match=r"incomplete checkpoint: it holds 2 data file\(s\) but no "
                                                         r"\.metadata"):
        C.require_committed(store)
    assert C.refuse_overwrite(store, overwrite=False) is False  # nothing committed: nothing to refuse
    C.publish(store, b"{}", b"md")
    assert C.is_committed(store) and C.commit_status(store).committed
    C.require_committed(store)
    with pytest.raises(CheckpointExistsError) as ei:
        C.refuse_overwrite(store, overwrite=False)
    msg = str(ei.value)
    # stock DCP's phrase (user code and stock tests match it), the location, and the way out
    assert msg.startswith("Checkpoint already exists") and store.url in msg and "overwrite=True" in msg, msg
    assert C.refuse_overwrite(store, overwrite=True) is True


class _Recording:
    """Wraps a store and records every remove / put, to check the order of a commit's steps."""

    def __init__(self, inner):
        self.inner, self.log = inner, []
        self.url = inner.url

    def remove(self, relpaths):
        relpaths = list(relpaths)
        self.log.append(("remove", tuple(relpaths)))
        self.inner.remove(relpaths)

    def put_atomic(self, relpath, data):
        self.log.append(("put", relpath))
        self.inner.put_atomic(relpath, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_uncommit_removes_metadata_before_anything_else(store):
    store.prepare_for_write()
    _put(store, "__0_0.distcp")
    C.publish(store, b"{}", b"md")
    rec = _Recording(store)
    C.uncommit(rec, also=[C.PERSISTED_MARKER])
    assert rec.log[0] == ("remove", (C.METADATA_NAME,)), rec.log
    assert ("remove", (C.MANIFEST_NAME, C.PERSISTED_MARKER)) in rec.log
    assert C.commit_status(store).state is C.CommitState.INCOMPLETE


def test_publish_writes_metadata_last(store):
    store.prepare_for_write()
    rec = _Recording(store)
    C.publish(rec, b"{}", b"md")
    assert rec.log == [("put", C.MANIFEST_NAME), ("put", C.METADATA_NAME)]


def test_remove_stale_data_only_top_level_unused_data(store):
    store.prepare_for_write()
    if isinstance(store, LocalStore):
        import os

        os.makedirs(os.path.join(store.root, "replica_of_rank1"))
    for n in ("__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "replica_of_rank1/__1_0.distcp", "notes.txt"):
        _put(store, n)
    assert sorted(C.remove_stale_data(store, {"__0_0.distcp"}, rank=0)) == ["__0_1.distcp"]
    assert sorted(C.remove_stale_data(store, {"__0_0.distcp"})) == ["__1_0.distcp"]
    assert sorted(store.list()) == ["__0_0.distcp", "notes.txt", "replica_of_rank1/__1_0.distcp"]
