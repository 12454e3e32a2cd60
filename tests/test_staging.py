"""PooledStager: exact checkpoints under mutation and back-to-back saves, pool reuse, errors."""

from __future__ import annotations

import gc
import logging
from concurrent.futures import Future

import pytest
import torch

import dcp_ext
from dcp_ext.errors import ConfigError, StagingBudgetError, StagingError, StagingPoolBusyError
from dcp_ext.staging import PooledStager
from tests import staging_rank_fns as fns
from tests.support.torch_features import needs_async_stager, needs_default_stager


def _no_mismatch(results):
    for rank, res in enumerate(results):
        for i, bad in enumerate(res["bad"]):
            assert bad == [], f"rank {rank} checkpoint {i}: values differ from the state at call time: {bad}"


# ---------------------------------------------------------------- multi-rank (gloo)
def test_mutate_after_return_exact_and_pool_reused(ranks, tmp_path):
    """Mutating right after async_save returns never leaks into the checkpoint; the 2nd and
    3rd saves copy into the very same buffers (same data_ptrs) as the 1st."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=3, wait_each=True)
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["pools_allocated"] == 1 and r["stats"]["stages"] == 3
        p0, p1, p2 = r["ptrs"]
        assert p0 == p1 == p2, "pool not reused"
        assert len(set(p0)) > 5  # real distinct buffers were compared, not an empty list


def test_back_to_back_slow_upload_waits_never_overwrites(ranks, tmp_path):
    """One pool, uploads slower than the save interval: each save waits for the previous
    upload (it must not overwrite the pool the upload still reads); all exact."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=3, gated=True)
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["waits"] == 2, r["stats"]  # the 2nd and 3rd saves found the pool busy
        assert r["stats"]["pools_allocated"] == 1
        assert r["ptrs"][0] == r["ptrs"][1] == r["ptrs"][2]


@needs_default_stager
def test_control_reused_default_stager_corrupts(tmp_path):
    """Control for the test above (one process, no_dist): stock DefaultStager reused across
    saves caches buffers without ownership, so a save issued while the previous upload still
    runs overwrites it: the checkpoint holds already-mutated values. This proves the scenario
    detects overwriting (and is why PooledStager exists). Our stager, same scenario: exact.
    The 1st upload is held until the 2nd save has been issued (DefaultStager) or is waiting
    for the pool (PooledStager): no sleeps, the same outcome on a loaded machine."""
    import threading

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    def run(stager):
        sd = {"w": torch.arange(1000.0), "b": torch.ones(7, dtype=torch.int64)}
        second_issued = threading.Event()

        def release_first() -> bool:
            return second_issued.is_set() or (isinstance(stager, PooledStager) and stager.stats["waits"] >= 1)

        refs, futs = [], []
        for i in range(2):
            refs.append({k: v.clone() for k, v in sd.items()})
            writer = fns.GatedWriter(str(tmp_path / f"{id(stager)}_{i}"), release_first if i == 0 else lambda: True)
            futs.append(dcp_ext.async_save(sd, async_stager=stager, no_dist=True, storage_writer=writer))
            for v in sd.values():
                v.add_(1)
        second_issued.set()
        for f in futs:
            f.result()
        ok = []
        for i in range(2):
            out = {"w": torch.zeros(1000), "b": torch.zeros(7, dtype=torch.int64)}
            dcp.load(out, checkpoint_id=str(tmp_path / f"{id(stager)}_{i}"), no_dist=True)
            ok.append(all(torch.equal(out[k], refs[i][k]) for k in out))
        stager.close()
        return ok

    assert run(DefaultStager(StagingOptions(False, False, False, False))) == [False, True]
    pooled = PooledStager()
    assert run(pooled) == [True, True] and pooled.stats["waits"] == 1


@needs_async_stager
def test_second_pool_within_budget(ranks, tmp_path):
    """max_pools=2 and a budget for two: the 2nd save uses a second pool instead of waiting."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=2, gated=True,
                       stager_kw={"max_pools": 2, "memory_budget": 1 << 20})
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["pools_allocated"] == 2 and r["stats"]["waits"] == 0
        assert set(r["ptrs"][0]).isdisjoint(r["ptrs"][1])


@needs_async_stager
def test_budget_for_one_pool_only_waits(ranks, tmp_path):
    """max_pools=2 but a budget that fits one pool: the 2nd save waits, no 2nd pool."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=2, gated=True, with_dtensor=False,
                       stager_kw={"max_pools": 2, "memory_budget": 16 * 1024})
    _no_mismatch(res)
    for r in res:
        assert 8 * 1024 < r["pool_bytes"] <= 16 * 1024  # one pool fits the budget, two do not
        assert r["stats"]["pools_allocated"] == 1 and r["stats"]["waits"] == 1


@needs_async_stager
@pytest.mark.parametrize("mode", ["stock", "track"])
def test_stock_dcp_async_save_is_safe(ranks, tmp_path, mode):
    """Plain dcp.async_save(async_stager=stager) with no tracking (reference-count release)
    and with stager.track(future): back-to-back slow uploads still exact."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=3, gated=True, mode=mode)
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["pools_allocated"] == 1 and r["stats"]["waits"] == 2, r["stats"]


@pytest.mark.parametrize("share", [True, False])
def test_process_executor(ranks, tmp_path, share):
    """AsyncCheckpointerType.PROCESS: shared-memory pool (or one moved there by torch on the
    first save) reused, checkpoints exact."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=2, delay=0.2, executor="process",
                       with_dtensor=False, stager_kw={"share_memory": share}, timeout=180)
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["pools_allocated"] == 1
        assert r["ptrs"][0] == r["ptrs"][1] or not share  # a non-shared pool is moved once
        assert r["shared"] == [True]


def test_with_dcp_ext_storage_writer(ranks, tmp_path):
    """Back-to-back saves through dcp_ext.storage_writer / storage_reader: exact."""
    res = ranks(2).run(fns.save_mutate_check, str(tmp_path), n_saves=3, ext_writer=True)
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["pools_allocated"] == 1 and r["ptrs"][0] == r["ptrs"][2]


def test_structure_change_rebuilds_pool(ranks, tmp_path):
    res = ranks(2).run(fns.restructure, str(tmp_path))
    _no_mismatch(res)
    for r in res:
        assert r["stats"]["rebuilds"] == 1 and r["stats"]["pools_allocated"] == 2 and r["n_pools"] == 1


# ---------------------------------------------------------------- single process
def test_budget_exceeded_message():
    st = PooledStager(memory_budget=1000)
    with pytest.raises(StagingBudgetError) as ei:
        st.stage({"model.embed": torch.zeros(1000), "tiny": torch.zeros(2)})
    msg = str(ei.value)
    assert "memory_budget" in msg and "'model.embed' 3.91 KiB" in msg and "1000 bytes" in msg
    assert "at least 4096" in msg  # 4000 bytes + 8 bytes, each 64-byte aligned
    assert isinstance(ei.value, ConfigError)
    st.close()


@pytest.mark.parametrize("kw,match", [
    ({"max_pools": 0}, "max_pools must be an int >= 1"),
    ({"memory_budget": -5}, "memory_budget must be a positive int"),
    ({"wait_timeout": -1}, "wait_timeout must be >= 0"),
    ({"warn_every_s": 0}, "warn_every_s must be > 0"),
    ({"max_pools": True}, "max_pools must be an int >= 1"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        PooledStager(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_pin_memory_without_cuda():
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        PooledStager(pin_memory=True)


def test_unsupported_values_named():
    st = PooledStager()
    with pytest.raises(StagingError, match=r"sparse_coo tensor at 'opt.s'"):
        st.stage({"opt": {"s": torch.zeros(3, 3).to_sparse()}})
    with pytest.raises(StagingError, match=r"meta tensor at 'm'"):
        st.stage({"m": torch.empty(3, device="meta")})
    with pytest.raises(StagingError, match="expects a dict"):
        st.stage([torch.zeros(1)])  # type: ignore[arg-type]
    st.close()
    with pytest.raises(StagingError, match="after close"):
        st.stage({"a": torch.zeros(1)})


def test_busy_pool_times_out_loudly():
    """An untracked staged dict that is still referenced keeps the pool: the next save waits
    and, past wait_timeout, raises a message that says what to do."""
    st = PooledStager(wait_timeout=0.2)
    held = st.stage({"w": torch.ones(4)})
    with pytest.raises(StagingPoolBusyError) as ei:
        st.stage({"w": torch.zeros(4)})
    msg = str(ei.value)
    assert "untracked" in msg and "staged tensor reference(s) still alive" in msg and "track(future)" in msg
    assert torch.equal(held["w"], torch.ones(4))  # the held copy was not overwritten
    del held
    gc.collect()
    again = st.stage({"w": torch.zeros(4)})  # reference gone: the pool is free again
    assert torch.equal(again["w"], torch.zeros(4))
    del again
    st.close()


def test_track_releases_on_future_done_and_errors():
    st = PooledStager(wait_timeout=0.2)
    with pytest.raises(StagingError, match="no staged checkpoint is waiting"):
        st.track(Future())
    with pytest.raises(TypeError, match="expects the Future or AsyncSaveResponse"):
        st.track(42)
    keep = st.stage({"w": torch.ones(4)})  # still referenced ...
    fut: Future = Future()
    st.track(fut)
    with pytest.raises(StagingPoolBusyError, match="tracked upload future not done"):
        st.stage({"w": torch.zeros(4)})
    fut.set_result(None)  # ... but a tracked lease ends when its upload future is done
    st.stage({"w": torch.zeros(4)})
    assert torch.equal(keep["w"], torch.zeros(4))  # (so a stale reference sees reuse)
    with pytest.raises(StagingPoolBusyError):  # close() waits for the untracked 3rd save's reference
        st.close()
    del keep
    gc.collect()
    st.close()


def test_wrapper_single_process(tmp_path, caplog):
    """dcp_ext.async_save without a process group (no_dist) and a log line per allocation."""
    import torch.distributed.checkpoint as dcp

    st = PooledStager()
    sd = {"a": torch.arange(6.0), "b": {"c": [torch.ones(2), 5]}}
    with caplog.at_level(logging.INFO, logger="dcp_ext.staging"):
        for i in range(2):
            dcp_ext.async_save(sd, async_stager=st, checkpoint_id=str(tmp_path / str(i)), no_dist=True).result()
            sd["a"].add_(1)
    assert sum("allocated pool" in r.message for r in caplog.records) == 1
    out = {"a": torch.zeros(6), "b": {"c": [torch.zeros(2), 0]}}
    dcp.load(out, checkpoint_id=str(tmp_path / "1"), no_dist=True)
    assert torch.equal(out["a"], torch.arange(6.0) + 1) and out["b"]["c"][1] == 5
    st.close()


@pytest.mark.parametrize("share", [False, True])
def test_staged_tensor_storage_layout(share):
    """Private pool: each staged tensor owns a storage of exactly its size (so stock
    FileSystemWriter does not clone it during the upload), all inside one allocation.
    Shared pool: plain views of one shared segment (one handle for the process executor)."""
    st = PooledStager(share_memory=share, wait_timeout=10)
    src = {"a": torch.randn(100), "b": torch.randn(3, 5).to(torch.bfloat16), "e": torch.empty(0, 2),
           "s": torch.tensor(3)}
    staged = st.stage(src)
    for k, v in staged.items():
        assert torch.equal(v, src[k]) and v.dtype == src[k].dtype and v.shape == src[k].shape
    if share:
        assert len({v.untyped_storage().data_ptr() for k, v in staged.items() if k != "e"}) == 1
        assert staged["a"].untyped_storage().is_shared()
    else:
        for k, v in staged.items():
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
        base = st._pools[0].base.data_ptr()
        assert all(base <= v.data_ptr() < base + st.pool_bytes for k, v in staged.items() if k != "e")
    del staged, k, v
    st.close()  # no staged tensor referenced any more: returns at once


@needs_async_stager
def test_two_pools_uploads_do_not_overlap(tmp_path):
    """max_pools=2: the 2nd save stages into a second pool without waiting, but its upload
    starts only after the 1st upload ended (AsyncSaveResponse; its upload_completion). The 1st
    upload is held until the 2nd save has staged and then until the 2nd upload starts (at most
    1 s): uploads that could overlap would, and the counter of concurrent uploads would see it."""
    import threading
    import time

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

    lock = threading.Lock()
    active, peak, entered = [0], [0], []
    second_entered = threading.Event()
    held_since: list[float] = []

    class Counted(fns.GatedWriter):
        def write_data(self, plan, planner):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                entered.append(self.index)
            if self.index == 1:
                second_entered.set()
            try:
                fut = super().write_data(plan, planner)
                fut.wait()
                return fut
            finally:
                with lock:
                    active[0] -= 1

    def release_first() -> bool:  # polled by the 1st upload
        if st.stats["stages"] < 2:
            return False
        if not held_since:
            held_since.append(time.monotonic())
        return second_entered.is_set() or time.monotonic() - held_since[0] > 1.0

    st = PooledStager(max_pools=2)
    sd = {"w": torch.arange(64.0)}
    res = []
    for i in range(2):
        writer = Counted(str(tmp_path / str(i)), release_first if i == 0 else (lambda: True))
        writer.index = i
        res.append(dcp_ext.async_save(sd, async_stager=st, no_dist=True, storage_writer=writer))
        sd["w"].add_(1)
    assert all(isinstance(r, AsyncSaveResponse) for r in res)
    for r in res:
        r.upload_completion.result()
    assert st.stats["waits"] == 0 and st.stats["pools_allocated"] == 2
    assert entered == [0, 1] and peak[0] == 1, f"uploads overlapped: {entered}, {peak[0]} at once"
    for i in range(2):
        out = {"w": torch.zeros(64)}
        dcp.load(out, checkpoint_id=str(tmp_path / str(i)), no_dist=True)
        assert torch.equal(out["w"], torch.arange(64.0) + i)
    st.close()


def test_rebuild_log_line(caplog):
    st = PooledStager()
    with caplog.at_level(logging.INFO, logger="dcp_ext.staging"):
        a = st.stage({"w": torch.ones(4)})
        del a
        b = st.stage({"w": torch.ones(4), "new": torch.zeros(2, 2)})
    assert any("state dict structure changed; freeing pool 1" in r.message for r in caplog.records)
    assert torch.equal(b["new"], torch.zeros(2, 2)) and st.stats["rebuilds"] == 1 and len(st._pools) == 1
    del b
    st.close()


# ---------------------------------------------------------------- CUDA logic, without a device
# No GPU is available to this test suite. These tests run the CUDA branches of the stager
# against fakes (a recording cudart, fake streams/events, a CPU tensor that reports a CUDA
# device) to pin down their logic: page-locking of the one pool allocation and its release,
# and the ordering that makes the non-blocking device-to-host copies safe (side stream waits
# for the current stream, copies issued on the side stream, event recorded after the last
# copy and synchronized before stage() returns). The real device path is unmeasured.
class _FakeCudart:
    def __init__(self, rc: int = 0) -> None:
        self.rc, self.calls = rc, []

    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 - CUDA's name
        self.calls.append(("register", ptr, nbytes, flags))
        return self.rc

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    rt = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    return rt


def test_pinned_pool_is_registered_once_and_unregistered_on_close(fake_cuda):
    st = PooledStager()  # pin_memory=None: pinned because "CUDA is available"
    assert st.pin_memory
    for i in range(3):
        staged = st.stage({"a": torch.full((100,), float(i)), "b": torch.ones(3, dtype=torch.int64)})
        assert torch.equal(staged["a"], torch.full((100,), float(i)))
        del staged
    pool = st._pools[0]
    ptr, nbytes = pool.base.data_ptr(), pool.nbytes
    assert pool.pinned and nbytes == 448 + 64  # 400 and 24 bytes, each rounded up to 64: no power-of-2 rounding
    assert fake_cuda.calls == [("register", ptr, nbytes, 1)]  # one registration, reused by every save
    st.close()
    assert fake_cuda.calls[-1] == ("unregister", ptr)


def test_pinning_failure_is_reported(fake_cuda):
    fake_cuda.rc = 2
    st = PooledStager()
    with pytest.raises(StagingError, match=r"cudaHostRegister of 512 B staging pool failed \(cudaError 2\)"):
        st.stage({"a": torch.zeros(100), "b": torch.ones(3, dtype=torch.int64)})
    assert st.pool_bytes == 0
    fake_cuda.rc = 0
    assert torch.equal(st.stage({"a": torch.ones(2)})["a"], torch.ones(2))  # nothing leaked: works after
    gc.collect()
    st.close()


def test_pinned_pool_moved_to_shared_memory_is_an_error(fake_cuda):
    """The process executor moves a non-shared pool into shared memory (new pages): that
    would silently drop the page-locking, so the next save refuses with a remedy."""
    st = PooledStager()
    staged = st.stage({"a": torch.zeros(100)})
    del staged
    gc.collect()
    for v in st._pools[0].views:
        v.share_memory_()  # what torch.multiprocessing does when the executor pickles the staged dict
    with pytest.raises(StagingError, match="pinned pool was moved into shared memory.*share_memory=True"):
        st.stage({"a": torch.ones(100)})
    st._pools[0].pinned = False  # let close() free it
    st.close()


def test_device_to_host_copy_ordering(monkeypatch):
    """stage()'s CUDA branch: for a tensor on a CUDA device the side stream first waits for
    the current stream, the copy is issued on the side stream with non_blocking=True, an
    event is recorded on it after the last copy and synchronized before _copy_in returns;
    CPU tensors are copied synchronously outside the side stream."""
    import contextlib

    from dcp_ext.staging import _Leaf

    trace: list[tuple] = []
    active: list[object] = [None]

    class Stream:
        def __init__(self, device=None):
            self.device = device
            trace.append(("new_stream", str(device)))

        def wait_stream(self, other):
            trace.append(("wait_stream", other))

    class Event:
        def record(self, stream):
            trace.append(("record", stream.device and str(stream.device)))

        def synchronize(self):
            trace.append(("synchronize",))

    @contextlib.contextmanager
    def stream_ctx(s):
        active[0] = s
        try:
            yield
        finally:
            active[0] = None

    class FakeCuda(torch.Tensor):
        """A CPU tensor that reports cuda:0 and logs its copies (with the active stream)."""

        @property
        def device(self):
            return torch.device("cuda", 0)

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.copy_:
                trace.append(("copy", "side" if active[0] is not None else "none", kwargs.get("non_blocking", False)))
            return super().__torch_function__(func, types, args, kwargs)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "current")
    st = PooledStager()
    srcs = [torch.Tensor._make_subclass(FakeCuda, torch.arange(6.0)),
            torch.Tensor._make_subclass(FakeCuda, torch.ones(2, 3).t()),  # non-contiguous
            torch.arange(4, dtype=torch.int64)]  # a CPU tensor in the same state dict
    dsts = [torch.empty(6), torch.empty(3, 2), torch.empty(4, dtype=torch.int64)]
    st._copy_in([_Leaf(f"t{i}", s) for i, s in enumerate(srcs)], dsts)
    assert all(torch.equal(d, s.as_subclass(torch.Tensor)) for d, s in zip(dsts, srcs))
    assert trace == [("new_stream", "cuda:0"), ("wait_stream", "current"), ("copy", "side", True),
                     ("wait_stream", "current"), ("copy", "side", True),
                     ("record", "cuda:0"), ("synchronize",)]
    st.close()
