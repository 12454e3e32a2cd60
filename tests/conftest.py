"""Shared fixtures: long-lived gloo rank pools so the suite forms each group once."""

from __future__ import annotations

import pytest

from dcp_ext.testing import RankPool

_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """A cached :class:`RankPool` of ``world_size`` ranks (recreated if a test broke it)."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.broken:
        pool = RankPool(world_size)
        _POOLS[world_size] = pool
    return pool


@pytest.fixture
def ranks():
    """``ranks(n)`` -> a shared RankPool with n gloo ranks; ``ranks(n).run(fn, *args)``."""
    return get_pool


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
