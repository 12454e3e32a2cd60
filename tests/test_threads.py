"""The shared I/O thread pools (dcp_ext.storage.threads)."""

from __future__ import annotations

import os
import threading

import pytest

from dcp_ext.storage.threads import io_pool, run_all, submit_in_turn
from tests.support.torch_features import needs_per_context_crc_option


def test_results_in_order_and_pool_reused():
    names = []

    def f(i):
        names.append(threading.current_thread().name)
        return i * i

    assert run_all("test", 3, f, [(i,) for i in range(10)]) == [i * i for i in range(10)]
    assert io_pool("test", 3) is io_pool("test", 3)
    assert all(n.startswith("dcp_ext-test") for n in names)
    assert io_pool("test", 3) is not io_pool("other", 3)


def test_single_call_runs_inline():
    assert run_all("test", 4, lambda: threading.current_thread().name, [()]) == [threading.current_thread().name]


def test_first_error_raised_after_running_jobs_finished_and_rest_cancelled():
    """Job 0 fails while job 1 runs: run_all waits for job 1 (held until run_all returns, at most
    1 s: a run_all that returned at once would leave it running), cancels the queued jobs (those a
    worker grabbed before the cancellation are held until job 1 ends: without the cancellation
    all 50 would start) and raises job 0's error. Events, no sleeps."""
    started, finished = [], []
    job1_running, job1_done, returned = threading.Event(), threading.Event(), threading.Event()

    def f(i):
        started.append(i)
        if i == 0:
            assert job1_running.wait(30)
            raise ValueError("boom in job 0")
        if i == 1:
            job1_running.set()
            returned.wait(1.0)
            finished.append(i)
            job1_done.set()
            return
        assert job1_done.wait(30)
        finished.append(i)

    with pytest.raises(ValueError, match="boom in job 0"):
        run_all("test-err", 2, f, [(i,) for i in range(50)])
    returned.set()
    assert 1 in finished  # the running job was waited for
    assert sorted(finished) == sorted(i for i in started if i != 0)  # nothing still runs
    assert len(started) < 50, started  # queued jobs were cancelled


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_fresh_pools():
    run_all("test-fork", 2, lambda i: i, [(1,), (2,)])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's pool threads do not exist here; a new pool must work
        try:
            ok = run_all("test-fork", 2, lambda i: i + 1, [(1,), (2,)]) == [2, 3]
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_jobs_see_the_callers_context():
    """torch keeps set_crc32_options per context; a pool thread must see the caller's setting
    (else every multi-file save computed torch's zip CRC32 although the writer switched it off)."""
    import contextvars

    import torch

    from dcp_ext.storage.records import zip_crc_disabled

    var = contextvars.ContextVar("dcp_ext_test_var", default="unset")
    token = var.set("caller")
    try:
        assert run_all("test-ctx", 2, lambda i: var.get(), [(i,) for i in range(6)]) == ["caller"] * 6
    finally:
        var.reset(token)
    with zip_crc_disabled():
        seen = run_all("test-ctx", 2, lambda i: torch.serialization.get_crc32_options(), [(0,), (1,)])
    assert seen == [False, False]
    assert torch.serialization.get_crc32_options() is True  # restored for the caller


@needs_per_context_crc_option
def test_zip_crc_switch_is_per_thread_and_restored():
    """Two threads disabling torch's zip CRC at overlapping times each get it off and each get their
    own setting back (a process-wide reference count left one thread's setting off for good)."""
    import torch

    from dcp_ext.storage.records import zip_crc_disabled

    inside, after = {}, {}
    entered, release = threading.Barrier(2), threading.Event()

    def user(name, hold):
        with zip_crc_disabled():
            inside[name] = torch.serialization.get_crc32_options()
            entered.wait(5)
            if hold:
                release.wait(5)
        if not hold:
            release.set()
        after[name] = torch.serialization.get_crc32_options()

    ts = [threading.Thread(target=user, args=("a", True)), threading.Thread(target=user, args=("b", False))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert inside == {"a": False, "b": False}
    assert after == {"a": True, "b": True}
    assert torch.serialization.get_crc32_options() is True


def test_calls_with_one_key_run_one_at_a_time_in_order_while_other_keys_run():
    pool = io_pool("test-turns", 4)
    lock = threading.Lock()
    running = {"a": 0, "b": 0}
    most = {"a": 0, "b": 0}
    order = {"a": [], "b": []}
    b_ran = threading.Event()

    def call(key, i):
        def fn():
            with lock:
                running[key] += 1
                most[key] = max(most[key], running[key])
                order[key].append(i)
            if key == "a" and i == 0:  # "a" waits for a "b" call: "b" runs while "a" holds its turn
                assert b_ran.wait(30)
            if key == "b":
                b_ran.set()
            with lock:
                running[key] -= 1
            return (key, i)
        return fn

    futs = [submit_in_turn(pool, key, call(key, i)) for i in range(10) for key in ("a", "b")]
    assert [f.result(timeout=60) for f in futs] == [(k, i) for i in range(10) for k in ("a", "b")]
    assert most == {"a": 1, "b": 1}
    assert order == {"a": list(range(10)), "b": list(range(10))}


def test_an_error_in_one_turn_goes_to_its_future_and_the_next_still_run():
    pool = io_pool("test-turns", 2)

    def boom():
        raise OSError(28, "No space left on device")

    futs = [submit_in_turn(pool, "f", lambda: 1), submit_in_turn(pool, "f", boom), submit_in_turn(pool, "f", lambda: 3)]
    assert futs[0].result(timeout=30) == 1 and futs[2].result(timeout=30) == 3
    with pytest.raises(OSError, match="No space left"):
        futs[1].result(timeout=30)
