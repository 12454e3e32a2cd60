import pytest

from dcp_ext.testing import RankFailedError, RankPool, RankTimeoutError, run_on_ranks
from tests import rank_fns


def test_run_on_ranks_one_rank():
    assert run_on_ranks(rank_fns.allreduce_rank, 1) == [0.0]


@pytest.mark.parametrize("n", [2, 4])
def test_pool_allreduce(ranks, n):
    expect = float(sum(range(n)))
    assert ranks(n).run(rank_fns.allreduce_rank) == [expect] * n


def test_failure_carries_rank_and_traceback(ranks):
    with pytest.raises(RankFailedError) as ei:
        ranks(2).run(rank_fns.fail_on_rank, 1)
    msg = str(ei.value)
    assert "rank 1 failed with ValueError" in msg and "boom on 1" in msg
    assert "fail_on_rank" in msg  # the remote traceback
    # the pool survives an exception that every rank returned from
    assert ranks(2).run(rank_fns.allreduce_rank) == [1.0, 1.0]


def test_peer_stuck_in_collective_is_reported_not_hung():
    pool = RankPool(2, pg_timeout=60, failure_grace=3)
    with pytest.raises(RankFailedError) as ei:
        pool.run(rank_fns.hang_in_collective, 0, timeout=30)
    assert "rank failed before the collective" in str(ei.value)
    assert pool.broken


def test_timeout():
    pool = RankPool(2)
    with pytest.raises(RankTimeoutError, match=r"ranks \[0, 1\] did not finish within 1.0s"):
        pool.run(rank_fns.sleep_forever, timeout=1.0)
    assert pool.broken
    with pytest.raises(RuntimeError, match="broken"):
        pool.run(rank_fns.allreduce_rank)


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        RankPool(0)


def test_children_see_parent_env_cwd_and_path(tmp_path, monkeypatch):
    # forkserver children are forked from a server started earlier: they must still see the
    # parent's environment *now* (and the pool's env), its working directory and sys.path
    import os
    import sys

    monkeypatch.setenv("DCP_EXT_HARNESS_PROBE", "parent-now")
    monkeypatch.chdir(tmp_path)
    out = run_on_ranks(rank_fns.env_and_cwd, 2, "DCP_EXT_HARNESS_PROBE")  # forkserver
    assert [o[0] for o in out] == ["parent-now"] * 2
    assert [o[1] for o in out] == [os.getcwd()] * 2
    assert all(set(sys.path) <= set(o[2]) for o in out)
    assert [o[3] for o in out] == [0, 1]
    with RankPool(1, env={"DCP_EXT_HARNESS_PROBE": "from-env"}) as pool:
        assert pool.run(rank_fns.env_and_cwd, "DCP_EXT_HARNESS_PROBE")[0][0] == "from-env"
    # the slower spawn method (one import of torch per rank) still works the same way
    with RankPool(1, env={"DCP_EXT_HARNESS_PROBE": "spawned"}, start_method="spawn") as pool:
        got = pool.run(rank_fns.env_and_cwd, "DCP_EXT_HARNESS_PROBE")[0]
    assert got[0] == "spawned" and got[1] == os.getcwd()


def test_bad_start_method():
    with pytest.raises(ValueError, match="start_method must be 'forkserver', 'spawn' or None, got 'fork'"):
        RankPool(1, start_method="fork")
    with pytest.raises(ValueError, match=r"preload= needs start_method='forkserver' \(or None\)"):
        RankPool(1, start_method="spawn", preload=["torch"])


def test_forkserver_with_preload():
    """The demo's fast start: ranks forked from a server that imported torch (and more) once."""
    assert run_on_ranks(rank_fns.allreduce_rank, 2, start_method="forkserver", preload=["tests.rank_fns"]) == [1.0, 1.0]
    with pytest.raises(RankFailedError, match=r"(?s)rank 1 failed with ValueError.*in fail_on_rank.*boom on 1"):
        run_on_ranks(rank_fns.fail_on_rank, 2, 1, start_method="forkserver")


def test_ranks_die_with_their_parent(tmp_path):
    """A pool owner killed with SIGKILL takes its ranks with it (no orphaned processes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from dcp_ext.testing import RankPool\n"
        "if __name__ == '__main__':\n"
        "    pool = RankPool(2)\n"
        "    print('PIDS', ' '.join(str(p.pid) for p in pool._procs), flush=True)\n"
        "    time.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        line = owner.stdout.readline()
        while line and not line.startswith("PIDS "):  # the ranks share stdout: torch 2.9's gloo prints there
            line = owner.stdout.readline()
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == 2
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        assert alive == [], f"ranks {alive} outlived their killed parent"
        # ... and so did the fork server (its command line names the owner script's directory)
        while time.monotonic() < deadline and _processes_mentioning(str(tmp_path)):
            time.sleep(0.1)
        assert _processes_mentioning(str(tmp_path)) == []
    finally:
        owner.kill()


def _alive(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is gone, only not yet reaped
    except FileNotFoundError:
        return False
    except OSError:
        os.kill(pid, 0)
        return True


def _processes_mentioning(text: str) -> list[int]:
    import os

    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _alive(int(d)):
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


def test_importing_every_module_arms_nothing(tmp_path):
    """A tool that imports every dcp_ext module (docs builders, walk_packages) must not arm the
    fork server's parent-death signal in its own process; the harness's fork server does arm it."""
    import subprocess
    import sys

    code = (
        "import ctypes, importlib, pkgutil, dcp_ext\n"
        "for m in pkgutil.walk_packages(dcp_ext.__path__, 'dcp_ext.'):\n"
        "    importlib.import_module(m.name)\n"
        "sig = ctypes.c_int(-1)\n"
        "ctypes.CDLL('libc.so.6').prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG\n"
        "print(sig.value)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"
    # with the harness's variable naming this process's parent, the import does arm it
    import os

    env = {**os.environ, "_DCP_EXT_PDEATHSIG_PARENT": str(os.getpid())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "9"
