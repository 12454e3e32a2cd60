"""The shared I/O thread pools (dcp_ext.storage.threads)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dcp_ext.storage.threads import io_pool, run_all


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
    started, finished = [], []
    gate = threading.Event()

    def f(i):
        started.append(i)
        if i == 0:
            raise ValueError("boom in job 0")
        if i == 1:
            gate.wait(0.2)  # still running when job 0 fails
            time.sleep(0.1)
        time.sleep(0.01)  # 48 queued jobs take ~0.5 s: the failure is seen long before they all start
        finished.append(i)

    with pytest.raises(ValueError, match="boom in job 0"):
        run_all("test-err", 2, f, [(i,) for i in range(50)])
    # the running job was waited for: nothing still runs after run_all raised
    snapshot = list(finished)
    time.sleep(0.3)
    assert finished == snapshot
    assert 1 in finished
    assert len(started) < 50  # queued jobs were cancelled


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
