"""Every branch of dcp_ext.torch_compat, old paths included, on whatever torch runs the tests.

CI runs torch 2.13, where each branch takes its modern path; these tests force the old paths by
putting an older torch's API in place (a ``_validate_global_plan`` that answers a bool, a
``Metadata`` without ``version``, torch 2.7's ``dcp.async_save`` signature, a process-wide CRC
switch), so the branches run in CI. ``tests/old_torch.sh`` runs them (and everything else) on a
real old torch.
"""

from __future__ import annotations

import gc
import inspect
import io
import logging
import math
import mmap
import pickle
import re
import threading
import weakref
from concurrent.futures import Future

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, default_planner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import dcp_ext
from dcp_ext import staging, torch_compat
from dcp_ext.errors import IncompleteCheckpointError, ReshardError
from dcp_ext.layout import ParallelLayout, ShardSpec
from dcp_ext.planner import ReshardSavePlanner
from dcp_ext.staging import PooledStager
from dcp_ext.storage import commit, manifest, records
from dcp_ext.torch_compat import async_save_kwargs, validate_global_plan
from tests.support.torch_features import needs_rank_local_save

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

_REAL_VALIDATE = default_planner._validate_global_plan


def _old_validate(global_plan, metadata):
    """Stock's check as torch 2.7/2.9 answer it: a bool, each problem only logged as a warning."""
    found = _REAL_VALIDATE(global_plan, metadata)  # logs every problem on any torch
    return found if isinstance(found, bool) else not found


def _tensor(size: int, *chunks: tuple[int, int]) -> TensorStorageMetadata:
    return TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([size]),
                                 [ChunkStorageMetadata(torch.Size([o]), torch.Size([n])) for o, n in chunks])


#: one tensor per kind of problem, on two ranks' plans (stock checks coverage with several ranks)
_PLAN = [SavePlan([]), SavePlan([])]
_METADATA = Metadata({"ok": _tensor(4, (0, 2), (2, 2)), "overlap": _tensor(4, (0, 3), (1, 1)),
                      "oob": _tensor(4, (0, 2), (3, 2)), "gap": _tensor(4, (0, 1), (2, 1))})
_PROBLEMS = ["key:overlap has overlapping chunks: ", "key:oob has out of bounds chunk: tensor-size:torch.Size([4]) ",
             "key:gap invalid fill tensor-volume: 4 chunks-volume: 2"]


def _check_problems(found: list[str]) -> None:
    assert len(found) == 3, found
    for prefix in _PROBLEMS:
        assert sum(f.startswith(prefix) for f in found) == 1, (prefix, found)


# ------------------------------------------------------------------ the global-plan check
def test_plan_problems_with_this_torch():
    _check_problems(validate_global_plan(_PLAN, _METADATA))
    assert validate_global_plan(_PLAN, Metadata({"ok": _tensor(4, (0, 2), (2, 2))})) == []


def test_plan_problems_when_stock_answers_a_bool(monkeypatch):
    """torch 2.7/2.9: the bool says whether, the warnings logged meanwhile say what (one line each)."""
    monkeypatch.setattr(default_planner, "_validate_global_plan", _old_validate)
    found = validate_global_plan(_PLAN, _METADATA)
    _check_problems(found)
    assert all("\n" not in f and "  " not in f for f in found)
    assert validate_global_plan(_PLAN, Metadata({"ok": _tensor(4, (0, 2), (2, 2))})) == []


def test_a_bool_answer_with_its_warnings_silenced_still_refuses(monkeypatch):
    monkeypatch.setattr(default_planner, "_validate_global_plan", lambda plan, md: False)
    assert validate_global_plan(_PLAN, _METADATA) == [
        "stock DCP's _validate_global_plan rejected the plan (its warnings on the "
        "'torch.distributed.checkpoint.default_planner' logger say why)"]


def test_warnings_of_other_threads_are_not_collected(monkeypatch):
    log = logging.getLogger(default_planner.__name__)

    def stock(plan, md):
        t = threading.Thread(target=log.warning, args=("key:other has overlapping chunks: elsewhere",))
        t.start()
        t.join()
        log.warning("key:mine has overlapping chunks: %s %s", 1, 2)
        return False

    monkeypatch.setattr(default_planner, "_validate_global_plan", stock)
    assert validate_global_plan(_PLAN, _METADATA) == ["key:mine has overlapping chunks: 1 2"]
    assert not any(isinstance(h, torch_compat._Collect) for h in log.handlers)  # handler removed


def test_reshard_planner_names_the_problems_when_stock_answers_a_bool(monkeypatch, tmp_path):
    """The planner's error is the same on both APIs: one problem listed once (torch 2.7 checks
    a single rank's coverage itself, as the planner does, so it is not listed twice)."""
    lay = ParallelLayout(tp_rank=1, tp_size=2, rules={"w": ShardSpec(0)})
    messages = []
    for old in (False, True):
        if old:
            monkeypatch.setattr(default_planner, "_validate_global_plan", _old_validate)
        with pytest.raises(BaseException) as ei:  # stock wraps it in a CheckpointException
            dcp.save({"w": torch.zeros(2), "v": torch.zeros(1)}, storage_writer=FileSystemWriter(str(tmp_path / str(old))),
                     planner=ReshardSavePlanner(lay), no_dist=True)
        messages += re.findall(rf"{ReshardError.__name__}: (ReshardSavePlanner: .*)", str(ei.value))
    assert len(messages) == 2 and messages[0] == messages[1], messages
    assert "(1 problems;" in messages[0] and messages[0].endswith("key:w invalid fill tensor-volume: 4 chunks-volume: 2")


# ------------------------------------------------------------------ Metadata.version
def test_manifest_decodes_where_metadata_has_no_version_field(monkeypatch, tmp_path):
    """torch 2.7's Metadata takes no version=: the manifest's dcp_version is left out there."""
    dcp.save({"t": torch.arange(6.0)}, storage_writer=dcp_ext.storage_writer(str(tmp_path)), no_dist=True)
    raw = (tmp_path / commit.MANIFEST_NAME).read_bytes()
    assert getattr(manifest.decode_manifest(raw, "here").metadata, "version", None) == (
        "1.0.0" if torch_compat.METADATA_HAS_VERSION else None)
    monkeypatch.setattr(torch_compat, "METADATA_HAS_VERSION", False)
    assert torch_compat.metadata_version("1.0.0") == {}
    assert getattr(manifest.decode_manifest(raw, "here").metadata, "version", None) is None  # 2.13's default
    out = {"t": torch.zeros(6)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path)), no_dist=True)
    assert torch.equal(out["t"], torch.arange(6.0))


# ------------------------------------------------------------------ dcp.async_save's arguments
def _async_save_27(state_dict, *, checkpoint_id=None, storage_writer=None, planner=None, process_group=None,
                   async_checkpointer_type=AsyncCheckpointerType.THREAD) -> Future:
    """torch 2.7's dcp.async_save signature (no async_stager, no_dist, use_collectives) over this torch's."""
    return _REAL_ASYNC_SAVE(state_dict, checkpoint_id=checkpoint_id, storage_writer=storage_writer, planner=planner,
                            process_group=process_group, async_checkpointer_type=async_checkpointer_type)


_REAL_ASYNC_SAVE = dcp.async_save


@pytest.fixture
def torch27_async_save(monkeypatch):
    monkeypatch.setattr(dcp, "async_save", _async_save_27)
    monkeypatch.setattr(torch_compat, "_ASYNC_SAVE_PARAMS", frozenset(inspect.signature(_async_save_27).parameters))
    monkeypatch.setattr(torch_compat, "ASYNC_SAVE_TAKES_STAGER", False)
    monkeypatch.setattr(staging, "ASYNC_SAVE_TAKES_STAGER", False)


@pytest.mark.parametrize("how", ["checkpoint_id", "storage_writer"])
def test_pooled_async_save_through_torch27s_signature(torch27_async_save, tmp_path, how):
    """The stager is applied by wrapping the writer (given, or the one stock picks for
    checkpoint_id); no_dist=True is dropped (2.7 saves alone without a process group); the pool is
    reused and handed back."""
    st = PooledStager()
    sd = {"w": torch.arange(10.0), "n": {"k": torch.ones(3, dtype=torch.int64)}}
    for i in range(3):
        url = str(tmp_path / str(i))
        where = {"checkpoint_id": url} if how == "checkpoint_id" else {"storage_writer": dcp_ext.storage_writer(url)}
        fut = dcp_ext.async_save(sd, async_stager=st, no_dist=True, **where)
        assert isinstance(fut, Future)
        fut.result()
        sd["w"].add_(1)
    st.wait_idle(timeout=30)
    assert st.stats["stages"] == 3 and st.stats["pools_allocated"] == 1
    out = {"w": torch.zeros(10), "n": {"k": torch.zeros(3, dtype=torch.int64)}}
    reader = FileSystemReader(str(tmp_path / "2")) if how == "checkpoint_id" else dcp_ext.storage_reader(
        str(tmp_path / "2"))
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], torch.arange(10.0) + 2) and torch.equal(out["n"]["k"], torch.ones(3, dtype=torch.int64))
    st.close()


def test_torch27_refusals(torch27_async_save, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"PooledStager: max_pools=2 needs torch >= 2\.9 \(dcp\.async_save must "
                                         r"accept a staging Future to keep uploads in order\); this is torch "):
        PooledStager(max_pools=2)
    with pytest.raises(TypeError, match=r"async_save\(use_collectives=False\) needs torch >= 2\.9 \(this is torch "
                                        r".*, whose dcp\.async_save has no use_collectives\)"):
        dcp_ext.async_save({"t": torch.ones(1)}, checkpoint_id=str(tmp_path), use_collectives=False)
    assert async_save_kwargs({"no_dist": True, "use_collectives": True, "checkpoint_id": "x"}) == {"checkpoint_id": "x"}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(TypeError, match=r"async_save\(no_dist=True\) with a process group initialised needs "
                                        r"torch >= 2\.9"):
        async_save_kwargs({"no_dist": True})
    assert async_save_kwargs({"no_dist": False}) == {}


def test_modern_arguments_pass_through_untouched():
    """On a torch whose async_save takes them (2.9, 2.13) nothing is dropped or wrapped."""
    if not torch_compat.ASYNC_SAVE_TAKES_STAGER:
        pytest.skip(f"torch {torch.__version__}: dcp.async_save has no async_stager")
    st = object()
    kw = {"no_dist": True, "use_collectives": False, "checkpoint_id": "x"}
    assert async_save_kwargs(kw, st) == {**kw, "async_stager": st}
    assert async_save_kwargs(kw) == kw


def test_staging_writer_delegates_and_pickles_only_the_writer(tmp_path):
    writer = FileSystemWriter(str(tmp_path))

    class Stager:
        should_synchronize_after_execute = True
        synced = 0

        def stage(self, sd):
            return {"staged": sd}

        def synchronize_staging(self):
            self.synced += 1

    st = Stager()
    proxy = torch_compat._StagingWriter(writer, st)
    from torch.distributed.checkpoint.staging import AsyncStager

    assert isinstance(proxy, AsyncStager)  # what torch 2.7's async_save checks before staging with it
    assert proxy.stage({"a": 1}) == {"staged": {"a": 1}} and proxy.should_synchronize_after_execute
    proxy.synchronize_staging()
    assert st.synced == 1 and proxy.path == writer.path
    clone = pickle.loads(pickle.dumps(proxy))  # the process executor pickles the writer
    assert clone.path == writer.path and clone._stager is None


# ------------------------------------------------------------------ the zip CRC switch
def test_the_probe_agrees_with_what_another_thread_sees():
    get, put = torch.serialization.get_crc32_options, torch.serialization.set_crc32_options
    assert get() is True
    t = threading.Thread(target=put, args=(False,))
    t.start()
    t.join()
    seen_here = get()
    put(True)
    assert torch_compat.crc_option_is_context_local() is seen_here


@pytest.fixture
def process_wide_crc(monkeypatch):
    """torch 2.7/2.9: one process-wide CRC setting (a plain variable here)."""
    setting = {"on": True}
    monkeypatch.setattr(torch.serialization, "get_crc32_options", lambda: setting["on"])
    monkeypatch.setattr(torch.serialization, "set_crc32_options", lambda v: setting.update(on=v))
    monkeypatch.setattr(torch_compat, "_crc_local", False)
    return setting


def test_process_wide_crc_stays_off_until_the_last_user_leaves(process_wide_crc):
    seen = {}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with records.zip_crc_disabled():
            seen["a inside"] = process_wide_crc["on"]
            a_in.set()
            b_in.wait(10)
        seen["after a left, b inside"] = process_wide_crc["on"]
        a_out.set()

    def b():
        a_in.wait(10)
        with records.zip_crc_disabled():
            b_in.set()
            a_out.wait(10)
            seen["b inside"] = process_wide_crc["on"]

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen == {"a inside": False, "after a left, b inside": False, "b inside": False}
    assert process_wide_crc["on"] is True and torch_compat._crc_users == 0


def test_process_wide_crc_restores_an_off_setting_and_survives_errors(process_wide_crc):
    process_wide_crc["on"] = False
    with pytest.raises(RuntimeError):
        with records.zip_crc_disabled():
            raise RuntimeError("boom")
    assert process_wide_crc["on"] is False and torch_compat._crc_users == 0
    process_wide_crc["on"] = True
    with records.zip_crc_disabled():
        assert process_wide_crc["on"] is False
    assert process_wide_crc["on"] is True


def test_a_save_under_the_process_wide_switch_loads_with_stock(process_wide_crc, tmp_path):
    sd = {"a": torch.arange(1000.0), "b": torch.ones(3, 4, dtype=torch.bfloat16)}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(str(tmp_path)), no_dist=True)
    assert process_wide_crc["on"] is True
    out = {"a": torch.zeros(1000), "b": torch.zeros(3, 4, dtype=torch.bfloat16)}
    dcp.load(out, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])


# ------------------------------------------------------------------ read_metadata errors inside dcp.load
def _incomplete(tmp_path) -> str:
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(4.0)}, storage_writer=dcp_ext.storage_writer(url), no_dist=True)
    (tmp_path / "ck" / commit.METADATA_NAME).unlink()
    return url


def test_the_detection_matches_what_stock_load_does(tmp_path):
    """The source-based answer agrees with a real dcp.load: where it says "hides", the reader's
    reason is missing from stock's error (torch 2.9); elsewhere it is there (2.7, 2.13)."""
    url = _incomplete(tmp_path)
    try:
        dcp.load({"t": torch.zeros(4)}, storage_reader=dcp_ext.storage_reader(url), no_dist=True)
    except BaseException as e:  # noqa: BLE001 - CheckpointException
        named = "is an incomplete checkpoint" in str(e)
    else:
        raise AssertionError("an incomplete checkpoint loaded")
    assert torch_compat.stock_load_hides_reader_errors() is (not named)


def _ours(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dcp_ext")]


def _stock_29_sequence(reader) -> list[str]:
    """What torch 2.9's loader does: read_metadata(), then read_metadata(rank=0), both failing."""
    errors = []
    for kwargs in ({}, {"rank": 0}):
        try:
            reader.read_metadata(**kwargs)
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
    return errors


def test_hidden_reader_errors_are_logged(monkeypatch, tmp_path, caplog):
    url = _incomplete(tmp_path)
    monkeypatch.setattr(torch_compat, "_hides", True)
    with caplog.at_level(logging.ERROR, logger="dcp_ext"):
        errors = _stock_29_sequence(dcp_ext.storage_reader(url))
    assert len(errors) == 2 and "is an incomplete checkpoint" in errors[0]
    logged = [(r.name, r.levelno, r.getMessage()) for r in _ours(caplog)]
    assert logged == [("dcp_ext.storage.reader", logging.ERROR, f"IncompleteCheckpointError: {errors[0]}"),
                      ("dcp_ext.storage.reader", logging.ERROR, f"IncompleteCheckpointError: {errors[1]}")]


def test_nothing_is_logged_where_stock_reports_the_errors(monkeypatch, tmp_path, caplog):
    url = _incomplete(tmp_path)
    monkeypatch.setattr(torch_compat, "_hides", False)
    with caplog.at_level(logging.ERROR, logger="dcp_ext"):
        assert len(_stock_29_sequence(dcp_ext.storage_reader(url))) == 2
    assert _ours(caplog) == []


@needs_rank_local_save
def test_a_rank_local_retry_that_succeeds_logs_nothing(monkeypatch, tmp_path, caplog):
    """A rank-local checkpoint has no global metadata by design: that first error is no news."""
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(4.0)}, storage_writer=dcp_ext.storage_writer(url), use_collectives=False)
    monkeypatch.setattr(torch_compat, "_hides", True)
    r = dcp_ext.storage_reader(url)
    with caplog.at_level(logging.ERROR, logger="dcp_ext"):
        with pytest.raises(IncompleteCheckpointError, match="holds a rank-local checkpoint"):
            r.read_metadata()
        assert "t" in r.read_metadata(rank=0).state_dict_metadata
    assert _ours(caplog) == []


# ------------------------------------------------------------------ torch.save's storage cycle
def _refs_after_save(save) -> tuple[int, int]:
    """The storage's reference count before and after ``save(t, buffer)``, with the GC off."""
    count = torch._C._storage_Use_Count
    t = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    before = count(t.untyped_storage()._cdata)
    was = gc.isenabled()
    gc.disable()
    try:
        save(t, io.BytesIO())
        return before, count(t.untyped_storage()._cdata)
    finally:
        if was:
            gc.enable()


def test_the_probe_agrees_with_a_plain_torch_save():
    before, after = _refs_after_save(torch.save)
    assert torch_compat.torch_save_keeps_storages() is (after > before)


@pytest.mark.parametrize("keeps", [False, True], ids=["modern", "cycle-cutting"])
def test_torch_save_keeps_no_storage_and_writes_the_same_bytes(monkeypatch, keeps):
    """Both paths on this torch: nothing holds the storage afterwards, the record is byte for byte
    torch.save's, loads back, and no pickler class is left noted."""
    if keeps:
        monkeypatch.setattr(torch_compat, "_leaks", True)  # torch 2.7/2.9's path, forced
    before, after = _refs_after_save(torch_compat.torch_save)
    assert after == before
    t = torch.arange(1 << 18, dtype=torch.float32).reshape(512, 512)
    ours, stock = io.BytesIO(), io.BytesIO()
    torch_compat.torch_save(t, ours)
    torch.save(t, stock)
    assert ours.getvalue() == stock.getvalue()
    assert torch.equal(torch.load(io.BytesIO(ours.getvalue()), weights_only=True), t)
    assert "cls" not in torch_compat._Pickler.made.__dict__


def test_a_streamed_import_frees_each_tensor_once_written(monkeypatch, tmp_path):
    """The defect the cut fixes (run it on torch 2.7/2.9: tests/old_torch.sh): every record's
    storage stayed alive until the cyclic GC, so an import held the whole checkpoint. With the GC
    off, each tensor the importer read (an mmap here) is freed by the time the import returns."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({f"t{i}": torch.full((1 << 18,), float(i)) for i in range(4)}, str(tmp_path / "m.safetensors"))
    from dcp_ext.convert import importing

    buffers = []

    def fresh(shape, dtype):
        m = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
        buffers.append(weakref.ref(m))
        return torch.frombuffer(m, dtype=torch.uint8).view(dtype).view(shape)

    monkeypatch.setattr(importing, "_fresh", fresh)
    was = gc.isenabled()
    gc.disable()
    try:
        dcp_ext.import_checkpoint(str(tmp_path / "m.safetensors"), str(tmp_path / "out"), progress=False)
        assert len(buffers) == 4 and [b() for b in buffers] == [None] * 4
    finally:
        if was:
            gc.enable()
    out = {f"t{i}": torch.zeros(1 << 18) for i in range(4)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / "out")), no_dist=True)
    assert all(torch.equal(out[f"t{i}"], torch.full((1 << 18,), float(i))) for i in range(4))


def test_plan_caching_where_stock_finish_plan_does_not_promote_the_local_plan(monkeypatch, tmp_path):
    """torch 2.7's ``DefaultSavePlanner.finish_plan`` does not move the pending local plan into
    the class cache (2.13's does): ReshardSavePlanner promotes it itself, so a repeat save with
    the same structure sends an empty plan there too, and still saves the new values exactly."""
    from torch.distributed.checkpoint.planner import SavePlanner

    def finish_plan_27(self, new_plan):  # torch 2.7's, verbatim in effect
        finished = self._finish_plan_with_caching(new_plan) if self._enable_plan_caching else new_plan
        self.plan = finished
        return finished

    monkeypatch.setattr(default_planner.DefaultSavePlanner, "finish_plan", finish_plan_27)
    sent: list[bool] = []

    class Counting(ReshardSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            sent.append(plan.usable)
            return plan

    for name in ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                 "_cached_metadata"):
        getattr(SavePlanner, name, {}).pop(Counting.__name__, None)
    layout = ParallelLayout(tp_rank=0, tp_size=1)
    for i in range(2):
        state = {"w": torch.arange(12.0).reshape(3, 4) + i, "b": torch.full((5,), float(i))}
        dcp.save(state, storage_writer=dcp_ext.storage_writer(str(tmp_path / f"s{i}")),
                 planner=Counting(layout, enable_plan_caching=True))
        got = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
        dcp.load(got, storage_reader=dcp_ext.storage_reader(str(tmp_path / f"s{i}")))
        assert torch.equal(got["w"], torch.arange(12.0).reshape(3, 4) + i) and torch.equal(got["b"], torch.full((5,), float(i)))
    assert sent == [True, False]
