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


def test_forkserver_with_preload():
    """The demo's fast start: ranks forked from a server that imported torch (and more) once."""
    assert run_on_ranks(rank_fns.allreduce_rank, 2, start_method="forkserver", preload=["tests.rank_fns"]) == [1.0, 1.0]
    with pytest.raises(RankFailedError, match=r"(?s)rank 1 failed with ValueError.*in fail_on_rank.*boom on 1"):
        run_on_ranks(rank_fns.fail_on_rank, 2, 1, start_method="forkserver")


def test_bad_start_method():
    with pytest.raises(ValueError, match="start_method must be one of"):
        RankPool(1, start_method="teleport")
    with pytest.raises(ValueError, match="preload= needs start_method='forkserver'"):
        RankPool(1, preload=["torch"])
