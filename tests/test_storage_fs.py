"""Local/NFS and fsspec backends: round trips, interop with stock DCP, commit protocol,
checksums, ranged reads and every bad input a user can make."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
)
from dcp_ext.storage.manifest import MANIFEST_NAME, METADATA_NAME
from dcp_ext.testing import RankFailedError
from tests import fs_rank_fns as F
from tests.support.errors import error_text
from tests.support.torch_features import needs_load_to_report_reader_errors

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _state():
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(33, 17, generator=g),
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "i64": torch.arange(100).reshape(10, 10),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "noncontig": torch.randn(8, 6, generator=g).t(),
        "view": torch.arange(50.0)[10:20],
        "bool": torch.rand(9, generator=g) > 0.5,
        "nested": {"a": torch.ones(3), "lst": [torch.full((2,), 4.0), "text"]},
        "obj": {"epoch": 3, "name": "run"},
    }


def _zeros_like(s):
    if isinstance(s, torch.Tensor):
        return torch.zeros_like(s)
    if isinstance(s, dict):
        return {k: _zeros_like(v) for k, v in s.items()}
    if isinstance(s, list):
        return [_zeros_like(v) for v in s]
    return None


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("url_kind", ["path", "file_url", "memory"])
def test_single_process_round_trip(tmp_path, url_kind):
    url = {"path": str(tmp_path / "ck"), "file_url": f"file://{tmp_path}/ck",
           "memory": f"memory://rt/{tmp_path.name}"}[url_kind]
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(url))
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(url))
    _assert_same(src, dst)


def test_layout_is_standard_dcp(tmp_path):
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(tmp_path, files_per_rank=3))
    names = sorted(os.listdir(tmp_path))
    assert names[:2] == [MANIFEST_NAME, METADATA_NAME]
    assert names[2:] == ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    # (xxh3_64 block checksums by default since issue 18: a version 3 manifest)
    assert manifest["format"] == "dcp-ext-manifest" and manifest["checksum_algorithm"] == "xxh3_64"
    assert manifest["version"] == 3
    assert manifest["state_dict_metadata"]["f32"]["size"] == [33, 17]


def test_stock_reader_loads_ours_and_we_load_stock(tmp_path):
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path / "ours"))
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp.FileSystemReader(tmp_path / "ours"))
    _assert_same(src, dst)

    dcp.save(src, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"))
    dst = _zeros_like(src)
    r = dcp_ext.storage_reader(tmp_path / "stock")
    dcp.load(dst, storage_reader=r)
    _assert_same(src, dst)


def test_metadata_read_without_unpickling(tmp_path, monkeypatch):
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path))
    import pickle

    def no_pickle(*a, **k):
        raise AssertionError("pickle.loads must not be used when a manifest exists")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    md = dcp_ext.storage_reader(tmp_path).read_metadata()
    assert md.state_dict_metadata["f32"].size == torch.Size([33, 17])


def test_checksums_off_and_verify_off(tmp_path):
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path, checksum=False))
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["checksum_algorithm"] is None
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path, verify=False))
    _assert_same(src, dst)


def test_ranged_read_fetches_only_needed_bytes(tmp_path):
    big = torch.arange(1024 * 256, dtype=torch.float32).reshape(1024, 256)  # 1 MiB
    dcp.save({"big": big}, storage_writer=dcp_ext.storage_writer(tmp_path, checksum_block_size="64KiB"))
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem, LoadItemType
    from torch.distributed.checkpoint.metadata import MetadataIndex

    r = dcp_ext.storage_reader(tmp_path)
    md = r.read_metadata()
    r.set_up_storage_reader(md, True)
    quarter = torch.zeros(256, 256)

    class P(DefaultLoadPlanner):
        def resolve_tensor(self, read_item):
            return quarter

        def commit_tensor(self, read_item, tensor):
            pass

    idx = MetadataIndex("big", torch.Size([0, 0]))
    req = ReadItem(LoadItemType.TENSOR, MetadataIndex("big", torch.Size([0, 0])), torch.Size([0, 0]),
                   idx, torch.Size([512, 0]), torch.Size([256, 256]))
    from torch.distributed.checkpoint.planner import LoadPlan

    r.read_data(LoadPlan([req]), P()).wait()
    assert torch.equal(quarter, big[512:768])
    assert r.stats.bytes_needed == 256 * 1024
    assert r.stats.bytes_read <= r.stats.bytes_needed + 2 * 64 * 1024  # at most a block each side
    # a column slice: spans with gaps wider than a page; without verification exactly the needed
    # bytes are read (gaps under 4 KiB would be read through: the kernel reads whole pages anyway)
    wide = torch.arange(64 * 4096, dtype=torch.float32).reshape(64, 4096)
    dcp.save({"wide": wide}, storage_writer=dcp_ext.storage_writer(tmp_path / "wide"))
    r2 = dcp_ext.storage_reader(tmp_path / "wide", verify=False)
    r2.set_up_storage_reader(r2.read_metadata(), True)
    cols = torch.zeros(64, 1024)

    class P2(P):
        def resolve_tensor(self, read_item):
            return cols

    widx = MetadataIndex("wide", torch.Size([0, 0]))
    req2 = ReadItem(LoadItemType.TENSOR, widx, torch.Size([0, 0]), widx, torch.Size([0, 1024]),
                    torch.Size([64, 1024]))
    r2.read_data(LoadPlan([req2]), P2()).wait()
    assert torch.equal(cols, wide[:, 1024:2048])
    assert r2.stats.bytes_read == r2.stats.bytes_needed == 64 * 1024 * 4
    assert r2.stats.requests == 64

    # many spans of one item (rows of 16 KiB, 4 KiB needed from each): read straight into one
    # packed buffer, several spans per thread task
    narrow = torch.arange(256 * 4096, dtype=torch.float32).reshape(256, 4096)
    dcp.save({"narrow": narrow}, storage_writer=dcp_ext.storage_writer(tmp_path / "narrow"))
    r3 = dcp_ext.storage_reader(tmp_path / "narrow", verify=False)
    r3.set_up_storage_reader(r3.read_metadata(), True)
    part = torch.zeros(256, 1024)

    class P3(P):
        def resolve_tensor(self, read_item):
            return part

    nidx = MetadataIndex("narrow", torch.Size([0, 0]))
    req3 = ReadItem(LoadItemType.TENSOR, nidx, torch.Size([0, 0]), nidx, torch.Size([0, 3072]),
                    torch.Size([256, 1024]))
    r3.read_data(LoadPlan([req3]), P3()).wait()
    assert torch.equal(part, narrow[:, 3072:4096])
    assert r3.stats.bytes_read == r3.stats.bytes_needed == 256 * 1024 * 4
    assert r3.stats.requests == 256


def test_commit_order_data_then_manifest_then_metadata_then_dir_fsync(tmp_path, monkeypatch):
    """Atomic commit on a file system: every data file is fsynced before anything is published; the
    manifest, then .metadata, are written under temporary names, fsynced, os.replace'd; .metadata
    is the last file to appear, and the directory is fsynced after it."""
    ck = tmp_path / "ck"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "<dir>" if path == str(ck) else os.path.basename(path)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(ck, files_per_rank=3))
    data = {f"__0_{k}.distcp" for k in range(3)}
    replaces = [e for e in events if e[0] == "replace"]
    assert [e[2] for e in replaces] == [MANIFEST_NAME, METADATA_NAME]
    assert all(re.fullmatch(re.escape(dst) + r"\.[0-9a-f]{8}\.tmp", tmp) for _, tmp, dst in replaces)
    i_manifest, i_metadata = events.index(replaces[0]), events.index(replaces[1])
    fsynced_data = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1] in data]
    assert {events[i][1] for i in fsynced_data} == data and max(fsynced_data) < i_manifest
    assert ("fsync", replaces[1][1]) in events[i_manifest:i_metadata]  # the temp .metadata was fsynced
    assert events[-1] == ("fsync", "<dir>") and events.index(events[-1], i_metadata) > i_metadata
    assert not [p for p in os.listdir(ck) if p.endswith(".tmp")]
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(ck))
    _assert_same(src, dst)
    # fsync can be switched off for scratch checkpoints (then nothing is fsynced)
    events.clear()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path / "scratch", fs={"fsync": False}))
    assert [e for e in events if e[0] == "fsync"] == []


@pytest.mark.parametrize("result", [0, -1])
def test_writeback_started_while_writing(tmp_path, monkeypatch, result):
    """Data files start their disk writeback as they grow (not all at the final fsync); a file
    system that refuses (-1) just stops being asked, and the save still succeeds."""
    from dcp_ext.storage import fs as fsmod

    calls = []

    def fake_sync_file_range(fd, offset, nbytes, flags):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        return result

    monkeypatch.setattr(fsmod, "_sync_file_range", fake_sync_file_range)
    monkeypatch.setattr(fsmod, "WRITEBACK_EVERY", 64 * 1024)
    src = {f"t{i}": torch.randn(64 * 1024) for i in range(4)}  # 256 KiB each, one file
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path / "a", io_threads=1))
    assert calls and {c[0] for c in calls} == {str(tmp_path / "a" / "__0_0.distcp")}
    assert all(c[1:] == (0, 0, 2) for c in calls)  # whole file, SYNC_FILE_RANGE_WRITE
    if result == 0:  # started as the file grows (at least once per tensor), at most once per 64 KiB written
        assert 4 <= len(calls) <= os.path.getsize(tmp_path / "a" / "__0_0.distcp") // (64 * 1024)
    else:  # refused once: never asked again
        assert len(calls) == 1
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path / "a"))
    _assert_same(src, dst)
    calls.clear()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path / "b", io_threads=1, fs={"fsync": False}))
    assert calls == []  # no fsync wanted: no early writeback either


def test_writeback_starter_exists_on_linux():
    from dcp_ext.storage import fs as fsmod

    if not os.uname().sysname == "Linux":
        pytest.skip("Linux only")
    fn = fsmod._writeback_starter()
    assert fn is not None
    with open(os.devnull, "wb") as f:
        assert fn(f.fileno(), 0, 0, 2) in (0, -1)


def test_failure_while_publishing_metadata_leaves_an_incomplete_checkpoint(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == METADATA_NAME:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(BaseException) as ei:
        dcp.save({"w": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(tmp_path))
    assert f"cannot write {tmp_path / METADATA_NAME}: Input/output error" in str(ei.value)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / METADATA_NAME).exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # the temporary file was removed
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        dcp_ext.storage_reader(tmp_path).read_metadata()


def test_writes_and_reads_run_on_several_threads(tmp_path, monkeypatch):
    from dcp_ext.storage.fs import LocalStore

    writers, readers = set(), set()
    open_writer, read_into = LocalStore.open_writer, LocalStore.read_into
    cond = threading.Condition()

    def meet(names: set) -> None:
        """Hold each thread until two distinct threads have arrived (at most 30 s: a one-thread
        implementation passes through after that and fails the assertions below)."""
        with cond:
            names.add(threading.current_thread().name)
            cond.notify_all()
            cond.wait_for(lambda: len(names) >= 2, timeout=30)

    def gated_open(self, relpath):
        meet(writers)
        return open_writer(self, relpath)

    def gated_read(self, relpath, offset, out):
        if relpath.endswith(".distcp"):  # (metadata is read on the calling thread)
            meet(readers)
        return read_into(self, relpath, offset, out)

    monkeypatch.setattr(LocalStore, "open_writer", gated_open)
    monkeypatch.setattr(LocalStore, "read_into", gated_read)
    g = torch.Generator().manual_seed(4)
    src = {f"t{i}": torch.randn(128, 256, generator=g) for i in range(8)}
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path, files_per_rank=4, io_threads=4))
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".distcp")) == [f"__0_{k}.distcp" for k in range(4)]
    assert len(writers) >= 2 and all(n.startswith("dcp_ext-write") for n in writers), writers
    dst = _zeros_like(src)
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path, io_threads=4))
    _assert_same(src, dst)
    assert len(readers) >= 2 and all(n.startswith("dcp_ext-read") for n in readers), readers


def test_close_ranges_are_coalesced_into_one_request(tmp_path):
    """Row pieces separated by less than the store's coalesce gap (4 KiB on local disk) are read as
    one request, gaps included; the box is still copied out exactly."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    wide = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)  # 4 KiB rows
    dcp.save({"wide": wide}, storage_writer=dcp_ext.storage_writer(tmp_path))
    r = dcp_ext.storage_reader(tmp_path, verify=False)
    r.set_up_storage_reader(r.read_metadata(), True)
    got = torch.zeros(64, 800)

    class P(DefaultLoadPlanner):
        def resolve_tensor(self, read_item):
            return got

        def commit_tensor(self, read_item, tensor):
            pass

    idx = MetadataIndex("wide", torch.Size([0, 0]))
    req = ReadItem(LoadItemType.TENSOR, idx, torch.Size([0, 0]), idx, torch.Size([0, 100]), torch.Size([64, 800]))
    r.read_data(LoadPlan([req]), P()).wait()
    assert torch.equal(got, wide[:, 100:900])
    assert r.stats.requests == 1  # 64 row pieces, 896-byte gaps: one read
    assert r.stats.bytes_needed == 64 * 800 * 4
    assert r.stats.bytes_read == (63 * 1024 + 800) * 4


# -- errors a user can run into ---------------------------------------------------------------

def test_missing_location(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="location does not exist"):
        dcp_ext.storage_reader(tmp_path / "nope").read_metadata()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="location is empty"):
        dcp_ext.storage_reader(tmp_path / "empty").read_metadata()


def test_incomplete_checkpoint_is_refused(tmp_path):
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(tmp_path))
    os.unlink(tmp_path / METADATA_NAME)
    with pytest.raises(IncompleteCheckpointError, match=r"incomplete checkpoint: it holds \d+ data file\(s\) but no "
                                                         r"\.metadata"):
        dcp_ext.storage_reader(tmp_path).read_metadata()
    assert "incomplete checkpoint" in error_text(
        lambda: dcp.load(_zeros_like(_state()), storage_reader=dcp_ext.storage_reader(tmp_path)))


def _first_item(tmp_path, fqn):
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    return next(i for i in m["items"] if i["index"][0] == fqn)


def test_corrupt_byte_names_file_and_fqn(tmp_path):
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(tmp_path))
    it = _first_item(tmp_path, "f32")
    p = tmp_path / it["file"]
    raw = bytearray(p.read_bytes())
    raw[it["offset"] + it["data_offset"] + 40] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(BaseException) as ei:
        dcp.load(_zeros_like(_state()), storage_reader=dcp_ext.storage_reader(tmp_path))
    msg = str(ei.value)
    assert "checksum mismatch" in msg and it["file"] in msg and "f32" in msg
    # verification can be switched off (then the corrupt value is loaded as is)
    dst = _zeros_like(_state())
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path, verify=False))
    assert not torch.equal(dst["f32"], _state()["f32"])


def test_corrupt_bytes_item(tmp_path):
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(tmp_path))
    it = _first_item(tmp_path, "obj.name")
    p = tmp_path / it["file"]
    raw = bytearray(p.read_bytes())
    raw[it["offset"] + 5] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(BaseException, match=r"checksum mismatch .* for obj.name"):
        dcp.load(_zeros_like(_state()), storage_reader=dcp_ext.storage_reader(tmp_path))


def test_truncated_file(tmp_path):
    dcp.save({"w": torch.randn(1000)}, storage_writer=dcp_ext.storage_writer(tmp_path, io_threads=1))
    p = tmp_path / "__0_0.distcp"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(BaseException, match=r"__0_0\.distcp is truncated.*while reading w"):
        dcp.load({"w": torch.zeros(1000)}, storage_reader=dcp_ext.storage_reader(tmp_path))


def test_missing_data_file(tmp_path):
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp_ext.storage_writer(tmp_path, io_threads=1))
    os.unlink(tmp_path / "__0_0.distcp")
    with pytest.raises(BaseException, match=r"__0_0\.distcp is missing: the checkpoint is damaged"):
        dcp.load({"w": torch.zeros(10)}, storage_reader=dcp_ext.storage_reader(tmp_path))


def test_metadata_and_manifest_from_different_saves(tmp_path):
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp_ext.storage_writer(tmp_path / "a"))
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp_ext.storage_writer(tmp_path / "b"))
    os.replace(tmp_path / "b" / METADATA_NAME, tmp_path / "a" / METADATA_NAME)
    with pytest.raises(CorruptCheckpointError, match="does not match .dcp_ext.json"):
        dcp_ext.storage_reader(tmp_path / "a").read_metadata()


def test_corrupt_metadata_files(tmp_path):
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp_ext.storage_writer(tmp_path / "ours"))
    md = tmp_path / "ours" / METADATA_NAME
    raw = bytearray(md.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    md.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata does not match \.dcp_ext\.json"):
        dcp_ext.storage_reader(tmp_path / "ours").read_metadata()
    # a stock checkpoint (no manifest) with a truncated .metadata
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"))
    md = tmp_path / "stock" / METADATA_NAME
    md.write_bytes(md.read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(md))} is unreadable"):
        dcp_ext.storage_reader(tmp_path / "stock").read_metadata()


def test_truncated_file_in_the_middle_of_an_item(tmp_path):
    """Truncation inside a tensor's data (not just its header): the error names the file and the FQN."""
    g = torch.Generator().manual_seed(2)
    src = {"a": torch.randn(1000, generator=g), "b": torch.randn(3000, generator=g)}
    dcp.save(src, storage_writer=dcp_ext.storage_writer(tmp_path, io_threads=1))
    it = _first_item(tmp_path, "b")
    p = tmp_path / it["file"]
    p.write_bytes(p.read_bytes()[:it["offset"] + it["data_offset"] + 5000])
    with pytest.raises(BaseException) as ei:
        dcp.load({"a": torch.zeros(1000), "b": torch.zeros(3000)}, storage_reader=dcp_ext.storage_reader(tmp_path))
    assert re.search(rf"{re.escape(it['file'])} is truncated.*while reading b\b", str(ei.value)), str(ei.value)


def test_garbage_manifest(tmp_path):
    dcp.save({"w": torch.randn(10)}, storage_writer=dcp_ext.storage_writer(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="unreadable manifest"):
        dcp_ext.storage_reader(tmp_path).read_metadata()


def test_refuses_overwrite_unless_asked(tmp_path):
    dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(tmp_path, files_per_rank=4))
    with pytest.raises(BaseException) as ei:
        dcp.save({"w": torch.zeros(3)}, storage_writer=dcp_ext.storage_writer(tmp_path))
    assert "already holds a complete checkpoint" in str(ei.value) and "overwrite=True" in str(ei.value)
    assert isinstance(ei.value.__context__ or ei.value, BaseException)
    dst = {"w": torch.zeros(3)}
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path))
    assert torch.equal(dst["w"], torch.ones(3))  # untouched
    dcp.save({"w": torch.full((3,), 2.0)}, storage_writer=dcp_ext.storage_writer(tmp_path, overwrite=True,
                                                                                    io_threads=1))
    dcp.load(dst, storage_reader=dcp_ext.storage_reader(tmp_path))
    assert torch.equal(dst["w"], torch.full((3,), 2.0))
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".distcp")) == ["__0_0.distcp"]  # stale removed


def test_checkpoint_exists_error_type(tmp_path):
    dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(tmp_path))
    w = dcp_ext.storage_writer(tmp_path)
    w.set_up_storage_writer(True, rank=0)
    from torch.distributed.checkpoint.planner import SavePlan

    with pytest.raises(CheckpointExistsError):
        w.prepare_local_plan(SavePlan([]))


def test_unwritable_target(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BaseException) as ei:
        dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(tmp_path / "afile" / "ck"))
    assert "cannot create checkpoint directory" in str(ei.value)
    w = dcp_ext.storage_writer(tmp_path / "afile")
    with pytest.raises(StorageError, match="not a directory"):
        w.store.prepare_for_write()


def test_unwritable_system_directory():
    """A target the OS refuses even to root (/sys is not writable in any container or host)."""
    target = "/sys/dcp_ext_test_ck"
    if not os.path.isdir("/sys") or os.path.exists(target):
        pytest.skip("needs a /sys that refuses new directories")
    with pytest.raises(BaseException) as ei:
        dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(target))
    assert f"cannot create checkpoint directory {target}:" in str(ei.value)
    assert not os.path.exists(target)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BaseException) as ei:
            dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(ro))
        assert "permission denied" in str(ei.value)
        with pytest.raises(BaseException) as ei:
            dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(ro / "sub"))
        assert "cannot create checkpoint directory" in str(ei.value)
    finally:
        ro.chmod(0o755)


def test_expect_world_size(tmp_path):
    dcp.save({"w": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(tmp_path))
    r = dcp_ext.storage_reader(tmp_path, expect_world_size=4)
    with pytest.raises(dcp_ext.DcpExtError, match="saved by 1 ranks but this load expects 4"):
        r.read_metadata()
    dcp_ext.storage_reader(tmp_path, expect_world_size=1).read_metadata()


def test_expect_world_size_of_a_stock_checkpoint(ranks, tmp_path, caplog):
    """Stock checkpoints carry no world size: the data files' rank numbers give a lower bound."""
    ranks(2).run(F.save_stock, str(tmp_path), 6, {"w": "row"})
    with pytest.raises(dcp_ext.DcpExtError, match="saved by at least 2 ranks .* but this load expects 1"):
        dcp_ext.storage_reader(tmp_path, expect_world_size=1).read_metadata()
    with caplog.at_level("WARNING", logger="dcp_ext"):
        dcp_ext.storage_reader(tmp_path, expect_world_size=2).read_metadata()
    assert "expect_world_size=2 could not be checked" in caplog.text


def test_checkpoint_id_reset(tmp_path):
    w = dcp_ext.storage_writer(tmp_path / "first")
    dcp.save({"w": torch.ones(2)}, storage_writer=w, checkpoint_id=tmp_path / "second")
    assert (tmp_path / "second" / METADATA_NAME).exists() and not (tmp_path / "first").exists()


# -- multi-rank (real gloo groups) --------------------------------------------------------------

@pytest.mark.parametrize("n_save,n_load", [(2, 4), (4, 2), (1, 2)])
def test_multirank_resharded_round_trip(ranks, tmp_path, n_save, n_load):
    url = str(tmp_path / "ck")
    save_layout = {"w": "row", "b": "row", "emb": "col"}
    load_layout = {"w": "col", "b": "rep", "emb": "row"}
    if n_save == 1:
        from dcp_ext.testing import run_on_ranks

        run_on_ranks(F.save_dtensors, 1, url, 11, save_layout)
    else:
        ranks(n_save).run(F.save_dtensors, url, 11, save_layout)
    for res in ranks(n_load).run(F.load_dtensors_and_compare, url, 11, load_layout):
        assert all(res["equal"].values()), res["equal"]
        assert res["step"] == 7 and res["meta"] == {"note": "hello", "ranks": n_save}


def test_multirank_interop_with_stock(ranks, tmp_path):
    ranks(4).run(F.save_dtensors, str(tmp_path / "ours"), 3, {"w": "row", "emb": "col"})
    for res in ranks(2).run(F.load_dtensors_and_compare, str(tmp_path / "ours"), 3, {"w": "col"}, "stock"):
        assert all(res["equal"].values())
    ranks(2).run(F.save_stock, str(tmp_path / "stock"), 4, {"w": "row"})
    for res in ranks(4).run(F.load_dtensors_and_compare, str(tmp_path / "stock"), 4, {"w": "col", "emb": "row"}):
        assert all(res["equal"].values())


def test_multirank_reads_only_its_share(ranks, tmp_path):
    url = str(tmp_path / "ck")
    ranks(2).run(F.save_dtensors, url, 5, {"w": "rep"}, {"checksum_block_size": "4KiB"})
    res = ranks(4).run(F.load_dtensors_and_compare, url, 5, {"w": "row", "emb": "row"})
    for r in res:
        assert all(r["equal"].values())
        assert r["bytes_read"] <= 1.3 * r["bytes_needed"] + 16384, r


def test_replicated_plain_tensors_written_once(ranks, tmp_path):
    written = ranks(2).run(F.save_plain_replicated, str(tmp_path))
    total = sum(w[0] for w in written)
    data = 8 * 256 * 256 * 4
    assert data <= total < data * 1.05  # each tensor stored once, not once per rank


def test_failed_save_keeps_earlier_checkpoints(ranks, tmp_path):
    good = str(tmp_path / "good")
    ranks(2).run(F.save_dtensors, good, 1, {"w": "row"})
    before = {p: (tmp_path / "good" / p).read_bytes() for p in os.listdir(good)}
    # a failing save in another directory
    with pytest.raises(Exception, match="refuses to be saved"):
        ranks(2).run(F.save_failing, str(tmp_path / "other"), 1)
    assert {p: (tmp_path / "good" / p).read_bytes() for p in os.listdir(good)} == before
    assert not (tmp_path / "other" / METADATA_NAME).exists()
    # a failing overwrite of the same directory leaves it incomplete, never half-old/half-new
    with pytest.raises(Exception, match="refuses to be saved"):
        ranks(2).run(F.save_failing, str(tmp_path / "good"), 0)
    with pytest.raises(IncompleteCheckpointError):
        dcp_ext.storage_reader(good).read_metadata()


def test_async_save_with_our_writer(ranks, tmp_path):
    assert ranks(2).run(F.async_save_and_load, str(tmp_path)) == [True, True]


def test_multirank_refuses_to_overwrite(ranks, tmp_path):
    url = str(tmp_path / "ck")
    ranks(2).run(F.save_dtensors, url, 21, {"w": "row"})
    before = {p: (tmp_path / "ck" / p).read_bytes() for p in os.listdir(url)}
    with pytest.raises(RankFailedError, match=r"(?s)already holds a complete checkpoint.*overwrite=True"):
        ranks(2).run(F.save_dtensors, url, 22, {"w": "col"})
    assert {p: (tmp_path / "ck" / p).read_bytes() for p in os.listdir(url)} == before
    for res in ranks(2).run(F.load_dtensors_and_compare, url, 21, {"w": "col"}):
        assert all(res["equal"].values()), res


@needs_load_to_report_reader_errors
def test_multirank_world_size_mismatch(ranks, tmp_path):
    url = str(tmp_path / "ck")
    ranks(2).run(F.save_dtensors, url, 31, {"w": "row"})
    with pytest.raises(RankFailedError, match="saved by 2 ranks but this load expects 4"):
        ranks(4).run(F.load_dtensors_and_compare, url, 31, {"w": "row"}, "ours", {"expect_world_size": 4})
    for res in ranks(2).run(F.load_dtensors_and_compare, url, 31, {"w": "col"}, "ours", {"expect_world_size": 2}):
        assert all(res["equal"].values()), res


def test_multirank_corrupt_byte_in_a_resharded_read(ranks, tmp_path):
    """A flipped byte in rank 1's shard of w, found by the ranks whose ranged reads touch it."""
    url = str(tmp_path / "ck")
    ranks(2).run(F.save_dtensors, url, 41, {"w": "row"}, {"checksum_block_size": "4KiB"})
    m = json.loads((tmp_path / "ck" / MANIFEST_NAME).read_text())
    it = next(i for i in m["items"] if i["index"] == ["w", [32, 0]])
    p = tmp_path / "ck" / it["file"]
    raw = bytearray(p.read_bytes())
    raw[it["offset"] + it["data_offset"] + 100] ^= 0x04  # row 32: read by rank 2 of 4
    p.write_bytes(bytes(raw))
    with pytest.raises(RankFailedError) as ei:
        ranks(4).run(F.load_dtensors_and_compare, url, 41, {"w": "row"})
    msg = str(ei.value)
    assert "checksum mismatch" in msg and it["file"] in msg and "for w chunk [32, 0]" in msg, msg
    # with verification off the flipped value loads as is (so the flip really hit w's data)
    res = ranks(2).run(F.load_dtensors_and_compare, url, 41, {"w": "row"}, "ours", {"verify": False})
    assert not res[0]["equal"]["w"] and res[0]["equal"]["emb"]


def test_write_threads_follow_ranks_per_host(tmp_path):
    """The coordinator counts the ranks of each host from the local plans, and a rank writes to a
    local file system with no more threads than its share of the host's cores (object stores:
    io_threads, they wait rather than compute)."""
    import os as _os

    from torch.distributed.checkpoint.planner import SavePlan

    from dcp_ext.storage.threads import HostInfo, cpu_workers
    from dcp_ext.storage.writer import _RankStorage

    w = dcp_ext.storage_writer(str(tmp_path / "c"))
    plans = [SavePlan([], storage_data=HostInfo(h)) for h in ("a", "a", "b")]
    out = w.prepare_global_plan(plans)
    assert [p.storage_data.ranks_on_host for p in out] == [2, 2, 1]
    assert [p.storage_data.rank for p in out] == [0, 1, 2]
    assert len({p.storage_data.save_id for p in out}) == 1 and isinstance(out[0].storage_data, _RankStorage)
    cpus = len(_os.sched_getaffinity(0))
    assert cpu_workers(8, True, 1) == min(8, cpus)
    assert cpu_workers(8, True, 10 ** 6) == 1
    assert cpu_workers(8, False, 10 ** 6) == 8
    # an empty "unchanged" plan (stock plan caching) still carries its host
    assert isinstance(w.prepare_local_plan(SavePlan([], usable=False)).storage_data, HostInfo)
    # the reader counts the same way
    from torch.distributed.checkpoint.planner import LoadPlan

    r = dcp_ext.storage_reader(str(tmp_path / "c"))
    got = r.prepare_global_plan([r.prepare_local_plan(LoadPlan([])), LoadPlan([], storage_data=HostInfo("z"))])
    assert [p.storage_data.ranks_on_host for p in got] == [1, 1]
    got = r.prepare_global_plan([r.prepare_local_plan(LoadPlan([])) for _ in range(3)])
    assert [p.storage_data.ranks_on_host for p in got] == [3, 3, 3]


def test_read_into_views_default_fills_each_view_from_one_span(tmp_path):
    """``Store.read_into_views`` (the default the reader uses for grouped small items on stores
    without their own, e.g. fsspec): consecutive views get consecutive bytes; a short file says so."""
    data = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(data)
    store = dcp_ext.storage_reader(str(tmp_path)).store
    views = [memoryview(bytearray(n)) for n in (7, 0, 1000, 33)]
    store.read_into_views("blob", 100, views)
    pos = 100
    for v in views:
        assert bytes(v) == data[pos:pos + len(v)]
        pos += len(v)
    with pytest.raises(Exception, match="truncated"):
        store.read_into_views("blob", len(data) - 10, [memoryview(bytearray(5)), memoryview(bytearray(20))])
