"""The ``dcp_ext.storage.tensorstore._rowio`` C extension (crc32c, preadv, pwritev over strided rows) and the zarr3
native path's in-place row I/O built on it (``tensorstore.native_rowio``): the same files and
tensors as the scratch path, the same errors."""

from __future__ import annotations

import errno
import logging
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("tensorstore")
import crc32c  # noqa: E402

import dcp_ext  # noqa: E402
from dcp_ext.errors import CorruptCheckpointError  # noqa: E402
from dcp_ext.storage.tensorstore import native  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

rowio = pytest.importorskip("dcp_ext.storage.tensorstore._rowio", reason="the C extension is not built (pip install -e . builds it)")
ROWIO_ENV = "DCP_EXT_TENSORSTORE_NATIVE_ROWIO"


def _rows_of(buf: np.ndarray, start: int, row: int, counts, strides) -> bytes:
    """The rows concatenated, computed independently of the extension (plain slicing)."""
    out = []

    def walk(pos, d):
        if d == len(counts):
            out.append(buf[pos:pos + row].tobytes())
            return
        for i in range(counts[d]):
            walk(pos + i * strides[d], d + 1)

    walk(start, 0)
    return b"".join(out)


def test_crc32c_matches_the_crc32c_package_on_contiguous_buffers(fold):
    rng = random.Random(1)
    raw = np.frombuffer(rng.randbytes(1 << 17), dtype=np.uint8)
    sizes = [0, 1, 7, 8, 9, 255, 767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 13, 100_003]
    for n in sizes:
        for start in (0, 1, 3, 7):  # unaligned starts
            data = raw[start:start + n].tobytes()
            for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
                want = crc32c.crc32c(data, value)
                assert rowio.crc32c(data, value) == want, (n, start, value)
                assert rowio.crc32c_portable(data, value) == want, (n, start, value)


def test_crc32c_rows_equals_the_crc_of_the_rows_concatenated(fold):
    rng = random.Random(2)
    buf = np.frombuffer(rng.randbytes(1 << 20), dtype=np.uint8).copy()
    base = buf.ctypes.data
    for _ in range(300):
        row = rng.choice([0, 1, 2, 3, 8, 31, 64, 100, 1024, 2048, 4096, rng.randrange(1, 5000)])
        ndim = rng.choice([0, 1, 1, 2, 3])
        counts = [rng.choice([0, 1, 2, 3, 5, 17]) for _ in range(ndim)]
        strides = []
        span = row
        for c in reversed(counts):  # rows never overlap: each stride at least the span below it
            s = span + rng.randrange(0, 300)
            strides.insert(0, s)
            span = s * max(c, 1)
        if span + 8 > buf.size:
            continue
        start = rng.randrange(0, min(8, buf.size - span))
        value = rng.choice([0, rng.getrandbits(32)])
        want = crc32c.crc32c(_rows_of(buf, start, row, counts, strides), value)
        assert rowio.crc32c_rows(base + start, row, tuple(counts), tuple(strides), value) == want, \
            (row, counts, strides, start)


@pytest.fixture(params=["fold", "crc32 chain"])
def fold(request):
    """Both crc32c paths of the extension: VPCLMULQDQ folding (where the CPU has it) and the
    crc32 instruction chain; the fold path is skipped on CPUs without AVX-512 VPCLMULQDQ."""
    if request.param == "fold" and not rowio.FOLD:
        pytest.skip("this CPU has no AVX-512 VPCLMULQDQ: the crc32 chain is the only path")
    before = rowio.use_fold(request.param == "fold")
    yield request.param
    rowio.use_fold(before)


def test_folded_crc32c_matches_the_package_at_every_step_boundary(fold):
    """Lengths around the fold's 256-byte step and its 1 KiB minimum, unaligned starts and
    continuation values; rows whose lengths do not divide the step (a step gathered across
    rows), many short rows, a row set of one long row."""
    rng = random.Random(3)
    raw = np.frombuffer(rng.randbytes(1 << 18), dtype=np.uint8).copy()
    sizes = [1023, 1024, 1025, 1279, 1280, 1281, 4096 - 1, 4096, 4096 + 255, 65536 + 17, (1 << 17) + 200]
    for n in sizes:
        for start in (0, 5):
            data = raw[start:start + n].tobytes()
            for value in (0, 0xDEADBEEF):
                assert rowio.crc32c(data, value) == crc32c.crc32c(data, value), (fold, n, start, value)
    base = raw.ctypes.data
    for row, count, stride in [(100, 37, 301), (257, 9, 260), (1, 3000, 2), (2048, 40, 4096), (255, 17, 255),
                               (64, 200, 64), (5000, 1, 5000), (300, 11, 1000)]:
        want = crc32c.crc32c(_rows_of(raw, 3, row, [count], [stride]), 7)
        assert rowio.crc32c_rows(base + 3, row, (count,), (stride,), 7) == want, (fold, row, count, stride)


def test_use_fold_switches_the_path_and_says_what_was_in_use():
    before = rowio.use_fold(False)
    try:
        assert rowio.use_fold(True) is False
        assert rowio.use_fold(True) is bool(rowio.FOLD)  # on only where the CPU can
    finally:
        rowio.use_fold(before)


def test_crc32c_rows_with_nothing_to_hash_returns_the_value():
    assert rowio.crc32c_rows(0, 0, (), (), 123) == 123
    assert rowio.crc32c_rows(0, 16, (0,), (16,), 7) == 7
    assert rowio.crc32c_rows(0, 0, (5, 3), (0, 0)) == 0


@pytest.mark.parametrize("call, message", [
    (lambda: rowio.crc32c_rows(1, -1, (), ()), "row_bytes must not be negative"),
    (lambda: rowio.crc32c_rows(1, 4, (-2,), (4,)), "a row count must not be negative"),
    (lambda: rowio.crc32c_rows(1, 4, (2, 3), (4,)), "counts and strides differ in length"),
    (lambda: rowio.crc32c_rows(1, 4, (2**62, 2**62), (4, 4)), "the number of rows overflows"),
    (lambda: rowio.crc32c_rows(1, 2**40, (2**40,), (1,)), r"rows \* row_bytes overflows"),
    (lambda: rowio.crc32c_rows(1, 2**70, (), ()), "row_bytes does not fit"),
    (lambda: rowio.crc32c_rows(-5, 4, (), ()), "address must be a non-negative int"),
    (lambda: rowio.crc32c_rows(0, 4, (), ()), "address is NULL"),
    (lambda: rowio.crc32c_rows(1, 4, (), (), 2**32), r"value must be a crc32c, an int in \[0, 2\*\*32\)"),
    (lambda: rowio.crc32c_rows(1, 4, (1,) * 65, (1,) * 65), "at most 64 leading dimensions"),
    (lambda: rowio.preadv_rows(0, -1, 1, 4, (), ()), "offset must not be negative"),
    (lambda: rowio.pwritev_rows(0, 0, 1, 4, (2**62,), (4,)), r"rows \* row_bytes overflows"),
])
def test_bad_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_argument_types_get_type_errors():
    with pytest.raises(TypeError, match="address must be an int"):
        rowio.crc32c_rows(1.5, 4, (), ())
    with pytest.raises(TypeError, match="counts must be a sequence"):
        rowio.crc32c_rows(1, 4, 3, (4,))
    with pytest.raises(BufferError, match="not writable"):
        rowio.preadv_rows(0, 0, 1, 4, (), (), b"read-only tail")  # the tail is read into


def test_pwritev_and_preadv_rows_round_trip_strided_rows_and_detect_a_short_file(tmp_path):
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, size=(7, 9, 40), dtype=np.uint8)
    tile = src[1:6, 2:8, 3:30]  # strided in both leading dims
    addr, row, counts, strides = native.row_set(tile)
    assert (row, counts) == (27, (5, 6))
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        rowio.pwritev_rows(fd, 10, addr, row, counts, strides, b"TAIL")
        with open(path, "rb") as f:
            assert f.read() == b"\0" * 10 + np.ascontiguousarray(tile).tobytes() + b"TAIL"
        out = np.zeros_like(src)
        dst = out[1:6, 2:8, 3:30]
        tail = bytearray(5)
        daddr, drow, dcounts, dstrides = native.row_set(dst)
        got = rowio.preadv_rows(fd, 10, daddr, drow, dcounts, dstrides, tail)
        assert got == tile.size + 4 and tail == b"TAIL\0"  # the file ends after the tail: one byte short
        assert np.array_equal(dst, tile) and not out[0].any() and not out[:, :, :3].any()
        os.ftruncate(fd, 10 + 100)
        assert rowio.preadv_rows(fd, 10, daddr, drow, dcounts, dstrides) == 100  # a short file
        assert rowio.preadv_rows(fd, 10**6, daddr, drow, dcounts, dstrides) == 0
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        rowio.preadv_rows(fd, 0, daddr, drow, dcounts, dstrides)  # closed
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        rowio.pwritev_rows(fd, 0, addr, row, counts, strides)
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("batch", [0, 1, 7, 100, 4096, 262144])
def test_write_rows_crc_writes_the_rows_their_crc32c_and_the_tail(tmp_path, batch, fold):
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, size=(40, 300), dtype=np.uint8)
    path = str(tmp_path / "f")
    for tile, tail, value in [(src[3:33, 5:260], b"index!", 0), (src, b"", 0xABCDEF), (src[:, :0], b"T", 5),
                              (src[:0], b"", 0), (src[2:3, 7:8], b"", 0)]:
        data = np.ascontiguousarray(tile).tobytes()
        want = crc32c.crc32c(data, value)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert rowio.write_rows_crc(fd, 3, *native.row_set(tile), tail, value, batch) == want
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == b"\0" * 3 + data + want.to_bytes(4, "little") + tail, (tile.shape, batch)
    with pytest.raises(ValueError, match="batch must not be negative"):
        rowio.write_rows_crc(0, 0, *native.row_set(src), None, 0, -1)
    with pytest.raises(OSError) as e:
        rowio.write_rows_crc(fd, 0, *native.row_set(src))  # closed
    assert e.value.errno == errno.EBADF


def test_more_rows_than_iov_max_go_in_several_calls(tmp_path):
    src = np.arange(3000 * 16, dtype=np.uint8).reshape(3000, 16)
    tile = src[:, :5]  # 3000 separate rows: more than IOV_MAX (1024) buffers
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        rowio.pwritev_rows(fd, 0, *native.row_set(tile))
        assert rowio.write_rows_crc(fd, tile.size, *native.row_set(tile), None, 0, 0) == \
            crc32c.crc32c(np.ascontiguousarray(tile))  # batch 0: as many rows a call as IOV_MAX allows
        out = np.zeros_like(src)
        assert rowio.preadv_rows(fd, 0, *native.row_set(out[:, 7:12])) == tile.size
    finally:
        os.close(fd)
    assert np.array_equal(out[:, 7:12], tile)
    with open(path, "rb") as f:
        data = np.ascontiguousarray(tile).tobytes()
        assert f.read() == data + data + crc32c.crc32c(data).to_bytes(4, "little")


def test_row_set_merges_contiguous_dims_and_refuses_a_strided_last_dim():
    a = np.zeros((4, 6, 8), dtype=np.float32)
    assert native.row_set(a)[1:] == (4 * 6 * 8 * 4, (), ())
    assert native.row_set(a[:, 1:3])[1:] == (2 * 8 * 4, (4,), (6 * 8 * 4,))
    assert native.row_set(a[:, :, 2:5])[1:] == (12, (4, 6), (192, 32))
    assert native.row_set(a[:, :, ::2]) is None
    assert native.row_set(a[:, :, 3:4])[1:] == (4, (4, 6), (192, 32))
    assert native.row_set(np.zeros((), dtype=np.int16))[1:] == (2, (), ())


# -- the zarr3 native path: in place (ON) vs through scratch (OFF) ---------------------------------

def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "w32": torch.randn(100, 72, generator=g),  # not a multiple of the chunk shape
        "w16": torch.randn(6, 40, 56, generator=g).to(torch.bfloat16),  # 3-D tiles, strided rows
        "mask": torch.rand(70, 300, generator=g) > 0.5,  # 1-byte rows
        "q": torch.randint(-128, 128, (33, 65), generator=g, dtype=torch.int8),
        "flat": torch.randn(5000, generator=g),
        "scalar": torch.tensor(3.5),
    }


class _Counting:
    """Wraps ``_rowio`` to count the in-place calls the native path makes."""

    def __init__(self, real):
        self.real = real
        self.calls = {"preadv_rows": 0, "write_rows_crc": 0}

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name not in self.calls:
            return fn

        def counted(*a):
            self.calls[name] += 1
            return fn(*a)
        return counted


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n not in (".metadata", ".dcp_ext.json"):  # name the save (its id): differ run to run
                p = os.path.join(d, n)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("shard", [None, "16KiB"])
def test_in_place_rows_give_the_same_files_and_tensors_as_the_scratch_path(tmp_path, monkeypatch, shard, fold):
    sd = _state()
    opts = {"chunk_size": "1KiB", "shard_size": shard}
    counting = _Counting(rowio)
    monkeypatch.setattr(native, "_rowio", counting)
    results = {}
    for on in ("1", "0"):
        monkeypatch.setenv(ROWIO_ENV, on)
        url = str(tmp_path / f"on{on}")
        dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, backend="tensorstore", tensorstore=opts))
        out = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp.load(out, storage_reader=dcp_ext.storage_reader(url, backend="tensorstore", tensorstore=opts))
        for k, v in sd.items():
            assert torch.equal(out[k], v), (on, k)
        results[on] = _files(url)
        if on == "1":
            assert counting.calls["write_rows_crc"] > 20 and counting.calls["preadv_rows"] > 20, counting.calls
            seen = dict(counting.calls)
    assert counting.calls == seen  # OFF made no in-place call
    assert results["1"].keys() == results["0"].keys()
    for name in results["1"]:
        assert results["1"][name] == results["0"][name], name
    # TensorStore itself reads what the in-place path wrote
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / "on1"), backend="tensorstore",
                                                         tensorstore={"native_file_io": False}))
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def test_in_place_reads_into_a_strided_destination_leave_the_rest_alone(tmp_path):
    w = torch.randn(64, 48)
    url = str(tmp_path / "c")
    dcp.save({"w": w}, storage_writer=dcp_ext.storage_writer(url, backend="tensorstore",
                                                             tensorstore={"chunk_size": "1KiB"}))
    big = torch.full((64, 80), 7.0)
    dest = big[:, 16:64]  # the tensor is a view with strided rows
    dcp.load({"w": dest}, storage_reader=dcp_ext.storage_reader(url, backend="tensorstore"))
    assert torch.equal(big[:, 16:64], w)
    assert torch.equal(big[:, :16], torch.full((64, 16), 7.0)) and torch.equal(big[:, 64:], torch.full((64, 16), 7.0))


def _chunk_files(d):
    return sorted(os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns if n != "zarr.json")


def _load_error(url: str, rows: str, monkeypatch) -> str:
    monkeypatch.setenv(ROWIO_ENV, rows)
    with pytest.raises(BaseException) as e:  # CheckpointException is a BaseException
        dcp.load({"layer.w": torch.zeros(64, 48)}, storage_reader=dcp_ext.storage_reader(url, backend="tensorstore"))
    return str(e.value)


@pytest.mark.parametrize("shard", [None, "16KiB"])
def test_a_flipped_byte_in_a_tile_read_in_place_fails_naming_the_tensor(tmp_path, monkeypatch, shard, fold):
    url = str(tmp_path / "c")
    dcp.save({"layer.w": torch.randn(64, 48)},
             storage_writer=dcp_ext.storage_writer(url, backend="tensorstore",
                                                   tensorstore={"chunk_size": "1KiB", "shard_size": shard}))
    path = _chunk_files(tmp_path / "c" / "layer.w")[0]
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x10]))
    on = _load_error(url, "1", monkeypatch)
    assert "CorruptCheckpointError" in on and "loading layer.w: a chunk fails its crc32c checksum" in on, on
    assert on == _load_error(url, "0", monkeypatch)  # the same message as the scratch path


def test_a_truncated_chunk_read_in_place_has_the_wrong_size(tmp_path, monkeypatch):
    url = str(tmp_path / "c")
    dcp.save({"layer.w": torch.randn(64, 48)},
             storage_writer=dcp_ext.storage_writer(url, backend="tensorstore",
                                                   tensorstore={"chunk_size": "1KiB", "shard_size": None}))
    paths = _chunk_files(tmp_path / "c" / "layer.w")
    os.truncate(paths[0], os.path.getsize(paths[0]) - 3)
    with open(paths[1], "ab") as f:
        f.write(b"x")
    on = _load_error(url, "1", monkeypatch)
    assert "loading layer.w: a chunk has the wrong size" in on and "than its" in on, on
    assert on == _load_error(url, "0", monkeypatch)


def test_in_place_write_and_read_failures_are_storage_errors(tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setenv(ROWIO_ENV, "1")
    url = str(tmp_path / "c")
    opts = {"chunk_size": "1KiB", "shard_size": None}
    full = []

    def on_full(self):  # every chunk file is /dev/full: each write fails with ENOSPC
        if not full:
            full.append(os.open("/dev/full", os.O_WRONLY))
        return full[0]

    counting = _Counting(rowio)
    monkeypatch.setattr(native, "_rowio", counting)
    monkeypatch.setattr(native._File, "fd", on_full)
    monkeypatch.setattr(native.os, "close", lambda fd, real=os.close: None if fd in full else real(fd))
    with pytest.raises(BaseException) as e:
        dcp.save({"layer.w": torch.randn(64, 48)},
                 storage_writer=dcp_ext.storage_writer(url, backend="tensorstore", tensorstore=opts))
    assert "saving layer.w: writing " in str(e.value) and "No space left on device" in str(e.value), str(e.value)
    assert not (tmp_path / "c" / ".metadata").exists()
    assert counting.calls["write_rows_crc"] >= 1  # the in-place write failed
    monkeypatch.undo()
    os.close(full[0])
    monkeypatch.setenv(ROWIO_ENV, "1")

    url = str(tmp_path / "d")
    dcp.save({"layer.w": torch.randn(64, 48)},
             storage_writer=dcp_ext.storage_writer(url, backend="tensorstore", tensorstore=opts))
    path = _chunk_files(tmp_path / "d" / "layer.w")[0]
    os.remove(path)
    os.mkdir(path)  # opens, but reading it fails (EISDIR)
    monkeypatch.setattr(native, "_rowio", counting)
    msg = _load_error(url, "1", monkeypatch)
    assert "loading layer.w: reading " in msg and "failed: Is a directory" in msg, msg
    assert counting.calls["preadv_rows"] >= 1


def test_without_the_extension_the_scratch_path_is_used_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_rowio", None)
    monkeypatch.setattr(native, "_rowio_said", None)
    sd = _state()
    url = str(tmp_path / "c")
    with caplog.at_level(logging.DEBUG, logger=native.__name__):
        dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, backend="tensorstore",
                                                           tensorstore={"chunk_size": "1KiB"}))
    assert "through scratch buffers (not built)" in caplog.text
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, backend="tensorstore"))
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert not native.rowio(True)
    monkeypatch.setattr(native, "_rowio", rowio)
    assert native.rowio(True) == rowio.HARDWARE and not native.rowio(False)


_SHORT_IO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
/* preadv/pwritev that move at most CAP bytes a call (cutting rows anywhere), as a network or FUSE
 * file system may: the callers must resume mid-file. Counts the calls it cut. */
#define CAP 1000
static long cut = 0;
typedef ssize_t (*vec_fn)(int, const struct iovec *, int, off_t);
static ssize_t capped(const char *name, int fd, const struct iovec *iov, int n, off_t off)
{
    vec_fn real = (vec_fn)dlsym(RTLD_NEXT, name);
    struct iovec mine[1024];
    size_t left = CAP, total = 0;
    int k = 0;
    for (; k < n && k < 1024 && left; k++) {
        mine[k] = iov[k];
        if (mine[k].iov_len > left)
            mine[k].iov_len = left;
        left -= mine[k].iov_len;
        total += iov[k].iov_len;
    }
    for (int j = k; j < n; j++)
        total += iov[j].iov_len;
    if (total > CAP)
        cut++;
    return real(fd, mine, k, off);
}
ssize_t preadv(int fd, const struct iovec *iov, int n, off_t off) { return capped("preadv", fd, iov, n, off); }
ssize_t preadv64(int fd, const struct iovec *iov, int n, off_t off) { return capped("preadv64", fd, iov, n, off); }
ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off) { return capped("pwritev", fd, iov, n, off); }
ssize_t pwritev64(int fd, const struct iovec *iov, int n, off_t off) { return capped("pwritev64", fd, iov, n, off); }
__attribute__((destructor)) static void report(void)
{
    const char *f = getenv("SHORT_IO_REPORT");
    FILE *o = f ? fopen(f, "w") : NULL;
    if (o) {
        fprintf(o, "%ld\n", cut);
        fclose(o);
    }
}
"""

_SHORT_IO_JOB = r"""
import sys, torch, torch.distributed.checkpoint as dcp, dcp_ext, warnings
from dcp_ext.storage.tensorstore import native
warnings.filterwarnings("ignore")
assert native.rowio(), "the in-place row path is not in use"
g = torch.Generator().manual_seed(0)
sd = {"w": torch.randn(96, 70, generator=g), "b": torch.randn(40, 33, generator=g).to(torch.bfloat16),
      "cube": torch.randn(6, 20, 30, generator=g)}
url = sys.argv[1]
opts = {"chunk_size": "2KiB", "shard_size": sys.argv[2] or None}
dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, backend="tensorstore", tensorstore=opts))
out = {k: torch.zeros_like(v) for k, v in sd.items()}
r = dcp_ext.storage_reader(url, backend="tensorstore")
dcp.load(out, storage_reader=r)
assert all(torch.equal(out[k], v) for k, v in sd.items())
assert r.stats.native == 3
print("OK")
"""


@pytest.mark.parametrize("shard", ["", "16KiB"])
def test_reads_and_writes_cut_short_mid_file_are_resumed(tmp_path, shard):
    """Every ``preadv``/``pwritev`` of the process moves at most 1000 bytes (an LD_PRELOAD shim, as a
    network file system may cut transfers): the C loops of ``_rowio`` resume mid-row and mid-file,
    and the save and load still round-trip exactly through the in-place path."""
    import shutil
    import subprocess
    import sys

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the LD_PRELOAD shim")
    src = tmp_path / "short_io.c"
    src.write_text(_SHORT_IO_SHIM)
    lib = tmp_path / "short_io.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], check=True)
    report = tmp_path / "cut"
    env = dict(os.environ, LD_PRELOAD=str(lib), SHORT_IO_REPORT=str(report),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop(ROWIO_ENV, None)
    import resource

    def limits() -> None:  # a resume loop gone wrong must fail here, not fill the disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))

    r = subprocess.run([sys.executable, "-c", _SHORT_IO_JOB, str(tmp_path / "ckpt"), shard], env=env,
                       capture_output=True, text=True, timeout=120, preexec_fn=limits)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert int(report.read_text()) > 10  # the shim did cut transfers short
