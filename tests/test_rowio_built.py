"""CI builds the optional C extension ``dcp_ext.storage.tensorstore._rowio``: ``.ci/run`` sets
``DCP_EXT_TEST_REQUIRE_ROWIO=1`` so that a failed compile (which ``pip install`` only warns about)
fails the suite. Elsewhere this test is skipped; ``tests/test_tensorstore_rowio.py`` tests the
extension wherever it is built."""

from __future__ import annotations

import importlib
import os
import platform

import pytest


@pytest.mark.skipif(os.environ.get("DCP_EXT_TEST_REQUIRE_ROWIO") != "1", reason="DCP_EXT_TEST_REQUIRE_ROWIO is not 1")
def test_the_rowio_extension_was_built_and_uses_hardware_crc32c():
    try:
        rowio = importlib.import_module("dcp_ext.storage.tensorstore._rowio")
    except ImportError as e:
        pytest.fail(f"dcp_ext.storage.tensorstore._rowio did not build at install (pip install -e . compiles dcp_ext/storage/tensorstore/_rowio.c): {e}")
    if platform.machine() in ("x86_64", "AMD64"):
        assert rowio.HARDWARE, "dcp_ext.storage.tensorstore._rowio found no SSE4.2 crc32 instructions on this x86-64 CPU"
    from dcp_ext.storage.tensorstore import native

    assert native.rowio(True) == rowio.HARDWARE
