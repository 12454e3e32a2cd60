"""Shared fixtures: long-lived gloo rank pools so the suite forms each group once."""

from __future__ import annotations

import os

# gcsfs (stock FsspecWriter on GCS in the interop tests) must not look for Google credentials
# or probe bucket types: set before anything imports it, and inherited by the rank processes.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pytest  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

# no per-example deadline anywhere: the machine is shared and loaded, and a slow example is not a bug
_hypothesis_settings.register_profile("dcp_ext", deadline=None)
_hypothesis_settings.load_profile("dcp_ext")

from dcp_ext.testing import RankPool  # noqa: E402

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


_SERVERS: dict[str, object] = {}


def _server(kind: str):
    """The session's S3 / GCS test server, started on first use and stopped at session end."""
    srv = _SERVERS.get(kind)
    if srv is None:
        from tests.support.servers import GCSTestServer, MotoS3Server, S3TestServer

        srv = {"s3": S3TestServer, "moto": MotoS3Server, "gcs": GCSTestServer}[kind]().start()
        _SERVERS[kind] = srv
    return srv


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (SeaweedFS ``weed mini``, MinIO, or DCP_EXT_TEST_S3_ENDPOINT)."""
    return _server("s3")


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server (a second S3 implementation), from a private environment built on first use;
    ``DCP_EXT_TEST_MOTO=0`` skips the tests that need it."""
    if os.environ.get("DCP_EXT_TEST_MOTO", "1") == "0":
        pytest.skip("DCP_EXT_TEST_MOTO=0: the moto S3 server tests are switched off")
    return _server("moto")


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1."""
    return _server("gcs")


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
    for srv in _SERVERS.values():
        srv.stop()
    _SERVERS.clear()
