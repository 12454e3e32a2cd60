"""Issue 17: compression that keeps ranged reads, and every stock DCP 2.13 on-disk format read by
our reader (local, fsspec memory://, S3 and GCS; gloo ranks; resharded loads; exact values)."""

from __future__ import annotations

import json
import os
import sys
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._extension import ZStandard

import dcp_ext
from dcp_ext import ParallelLayout, ReshardLoadPlanner, ShardSpec
from dcp_ext.errors import (ConfigError, CorruptCheckpointError, DcpExtError, IncompleteCheckpointError,
                            MissingDependencyError, UnsupportedFormatError)
from dcp_ext.storage import commit as C
from dcp_ext.storage.compression import (FrameTable, ShuffledZstd, decode_frame, decode_frame_into, frame_length,
                                         raw_frame, shuffle, unshuffle_into)
from dcp_ext.verify import verify_checkpoint
from tests import compression_rank_fns as Z
from tests import parity_rank_fns as P
from tests.support.errors import error_text
from tests.support.torch_features import needs_hf_storage, needs_safetensors_format

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint"),
              pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")]

zstandard = pytest.importorskip("zstandard")

#: small blocks: many frames per tensor at test sizes
BLOCK = "4KiB"


def _compressible(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Low-entropy bytes (each 0..3) of any dtype: zstd shrinks them about 3x."""
    n = int(torch.tensor(shape).prod()) * dtype.itemsize
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 4, (n,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        b = b % 2
    return b.view(dtype).reshape(shape)


def _template(state: dict) -> dict:
    return {k: (P.zeros(v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else dict.fromkeys(v, 0))
            for k, v in state.items()}


def _same(got: dict, want: dict) -> list[str]:
    return sorted(k for k, v in want.items()
                  if (P.tensor_bytes(got[k]) != P.tensor_bytes(v) if isinstance(v, torch.Tensor) else got[k] != v))


def _manifest(path) -> dict:
    return json.loads((path / C.MANIFEST_NAME).read_bytes())


# ------------------------------------------------------------------------------------ framing
@pytest.mark.parametrize("n", [0, 1, 128 * 1024, 128 * 1024 + 1, 1024 * 1024 + 3])
def test_raw_frames_are_standard_zstd(n):
    data = bytes((i * 7) % 251 for i in range(n))
    f = raw_frame(data)
    assert zstandard.ZstdDecompressor().decompress(f) == data  # any zstd decoder reads it
    assert len(f) == 9 + 3 * max(1, -(-n // (128 * 1024))) + n
    out = bytearray(n)
    decode_frame_into(f, memoryview(out))
    assert out == data and decode_frame(f) == data


def test_damaged_frames_are_named():
    z = zstandard.ZstdCompressor(write_content_size=True).compress(b"abc" * 1000)
    assert "the frame holds 3000 bytes, expected 10" in error_text(lambda: decode_frame_into(z, memoryview(bytearray(10))))
    assert "not a zstd frame" in error_text(lambda: decode_frame(b"PK\x03\x04" + bytes(20)))
    broken = bytearray(z)
    broken[len(broken) // 2:] = bytes(len(broken) - len(broken) // 2)
    assert "ValueError" in error_text(lambda: decode_frame(broken))


def test_shuffle_round_trips_and_frames_are_walked():
    data = bytes(range(240))
    for es in (2, 4, 8, 16):  # 2 and 4: shifts into words; 8 and 16: a transposed copy
        sh = shuffle(memoryview(bytearray(data)), es)
        assert bytes(sh[:240 // es]) == data[0::es] and bytes(sh[240 // es:480 // es]) == data[1::es]
        out = bytearray(240)
        unshuffle_into(memoryview(sh), memoryview(out), es)
        assert out == data, es
    z = zstandard.ZstdCompressor(write_checksum=True).compress(b"q" * 5000)
    stream = raw_frame(b"head") + z + raw_frame(b"")
    assert frame_length(stream) == 16 and frame_length(stream, 16) == len(z)
    assert "no zstd frame at byte 1" in error_text(lambda: frame_length(stream, 1))
    assert "truncated" in error_text(lambda: frame_length(stream[:26], 16))
    assert "written by dcp-ext itself" in error_text(lambda: ShuffledZstd().transform_to(None))


def test_frame_table_offsets():
    ft = FrameTable("zstd", 100, (10, 40, 50, 7, 5))  # head, 3 blocks, tail
    assert ft.nblocks == 3 and ft.stored_length == 112 and ft.stored_data_bytes == 97
    assert ft.block_frame(0) == (10, 40) and ft.block_frame(2) == (100, 7) and ft.frame_span(4) == (107, 5)
    assert ft.block_data(2, 250) == (200, 250)
    assert FrameTable.from_json(ft.to_json()) == ft


# ---------------------------------------------------------------- our compressed checkpoints
@pytest.mark.parametrize("where", ["local", "memory"])
def test_every_dtype_round_trips_compressed_and_stock_reads_it(tmp_path, where):
    state = {f"t.{str(d).removeprefix('torch.')}": _compressible(d, (512, 64), i) for i, d in enumerate(P.dcp_dtypes())}
    state["rand"] = P.filled(torch.float32, (64, 64), 5)  # does not compress: a plain record
    state["small"] = torch.arange(10)
    state["obj"] = {"step": 3}
    url = str(tmp_path / "ck") if where == "local" else f"memory://z-{uuid.uuid4().hex[:8]}"
    w = dcp_ext.storage_writer(url, compression="zstd", checksum_block_size=BLOCK)
    dcp.save(state, storage_writer=w)
    cs = w.stats.compression
    assert cs.items_compressed == len(P.dcp_dtypes()) and cs.items_plain == 2 and cs.ratio > 2
    r = dcp_ext.storage_reader(url)
    got = _template(state)
    dcp.load(got, storage_reader=r)
    assert _same(got, state) == []
    assert r.stats.blocks_verified >= cs.blocks_compressed and r.stats.bytes_read < sum(
        v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)) / 2
    # stock's reader decodes our frames as its own ZStandard stream: no registry, no dcp-ext
    if where == "local":
        stock = FileSystemReader(url)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        stock = FsspecReader(url)
    got = _template(state)
    dcp.load(got, storage_reader=stock)
    assert _same(got, state) == []
    assert verify_checkpoint(url).ok


def test_manifest_version_and_what_it_records(tmp_path):
    t = _compressible(torch.float32, (256, 64), 1)
    # (crc32c checksums: the version then says only whether items are compressed)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path / "z"), compression="zstd",
                                                             checksum_block_size=BLOCK, checksum_algorithm="crc32c"))
    doc = _manifest(tmp_path / "z")
    (item,) = doc["items"]
    assert doc["version"] == 2 and item["transforms"] == ["stream.zstd/1"]
    ft = item["compression"]
    assert ft["codec"] == "zstd" and ft["block_size"] == 4096 and len(ft["frames"]) == 256 * 64 * 4 // 4096 + 2
    assert sum(ft["frames"]) == item["length"] < item["data_length"]
    from dcp_ext.verify import inspect_checkpoint

    assert inspect_checkpoint(str(tmp_path / "z"))["compressed"] == {
        "items": 1, "data_bytes": 256 * 64 * 4, "stored_bytes": item["length"]}
    # without compression nothing changes: version 1, no frames, no transforms (stock interop as before)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path / "plain"), checksum_algorithm="crc32c"))
    doc = _manifest(tmp_path / "plain")
    assert doc["version"] == 1 and "compression" not in doc["items"][0] and "transforms" not in doc["items"][0]
    # compression on, but nothing worth compressing: still version 1
    dcp.save({"r": P.filled(torch.float32, (64, 64), 2)},
             storage_writer=dcp_ext.storage_writer(str(tmp_path / "r"), compression="zstd",
                                                   checksum_algorithm="crc32c"))
    assert _manifest(tmp_path / "r")["version"] == 1
    # xxh3_64 checksums (the default) need version 3, compressed or not; checksums off: version 1
    for name, opts, version in (("zx", {"compression": "zstd"}, 3), ("px", {}, 3), ("off", {"checksum": False}, 1)):
        dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path / name), **opts))
        doc = _manifest(tmp_path / name)
        assert doc["version"] == version, name
        assert doc["checksum_algorithm"] == (None if name == "off" else "xxh3_64")
        out = {"t": torch.zeros_like(t)}
        dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / name)))
        assert torch.equal(out["t"], t)


def test_a_newer_manifest_is_refused_by_version(tmp_path):
    dcp.save({"t": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(str(tmp_path)))
    doc = _manifest(tmp_path)
    doc["version"] = 4
    (tmp_path / C.MANIFEST_NAME).write_text(json.dumps(doc))
    msg = error_text(lambda: dcp_ext.storage_reader(str(tmp_path)).read_metadata())
    assert "manifest version 4 is newer than this dcp-ext understands (3); upgrade dcp-ext" in msg


def test_what_does_not_compress_is_stored_raw(tmp_path):
    """Random fp32 is sampled and written as a plain record (no frames); a tensor half zeros, half
    random is compressed where it pays and its random blocks are stored raw; min_ratio decides."""
    rnd = P.filled(torch.float32, (256, 64), 3)
    mixed = torch.cat([torch.zeros(128, 64), P.filled(torch.float32, (128, 64), 4)])
    state = {"rnd": rnd, "mixed": mixed}
    w = dcp_ext.storage_writer(str(tmp_path / "a"), compression="zstd", checksum_block_size=BLOCK)
    dcp.save(state, storage_writer=w)
    cs = w.stats.compression
    assert (cs.items_plain, cs.items_compressed) == (1, 1)
    assert cs.blocks_compressed == 8 and cs.blocks_raw == 8  # 32 KiB of zeros, 32 KiB of random
    items = {it["index"][0]: it for it in _manifest(tmp_path / "a")["items"]}
    assert "compression" not in items["rnd"] and items["rnd"]["length"] > 256 * 64 * 4
    raw_frames = items["mixed"]["compression"]["frames"][9:-1]
    assert all(f == 4096 + 9 + 3 for f in raw_frames)  # a raw zstd frame: 12 bytes of framing
    got = {"rnd": torch.zeros(256, 64), "mixed": torch.zeros(256, 64)}
    dcp.load(got, storage_reader=dcp_ext.storage_reader(str(tmp_path / "a")))
    assert _same(got, state) == []
    # a ratio this state does not reach (it shrinks about 3x): every tensor is a plain record
    w = dcp_ext.storage_writer(str(tmp_path / "b"), compression="zstd", compression_min_ratio=10)
    dcp.save({"z": _compressible(torch.float32, (256, 64), 1)}, storage_writer=w)
    assert (w.stats.compression.items_plain, w.stats.compression.items_compressed) == (1, 0)


def test_blocks_are_compressed_in_the_pool_and_loads_decompress_in_place(tmp_path):
    t = _compressible(torch.float32, (512, 64), 7)
    w = dcp_ext.storage_writer(str(tmp_path), compression="zstd", checksum_block_size=BLOCK, io_threads=2)
    dcp.save({"t": t}, storage_writer=w)
    if (os.cpu_count() or 1) > 1:
        assert w.stats.compression.threads and all(n.startswith("dcp_ext-compress") for n in
                                                   w.stats.compression.threads)
    r = dcp_ext.storage_reader(str(tmp_path))
    got = {"t": torch.zeros(512, 64)}
    dcp.load(got, storage_reader=r)
    assert torch.equal(got["t"], t)
    assert r.stats.blocks_decompressed == r.stats.blocks_direct == 32  # every block straight into got["t"]
    # a quarter of the rows (ranged): only its blocks; the edges go through scratch
    lay = ParallelLayout(tp_rank=1, tp_size=4, rules={"t": ShardSpec(0)})
    r = dcp_ext.storage_reader(str(tmp_path))
    got = {"t": torch.zeros(128, 64)}
    dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay))
    assert torch.equal(got["t"], t[128:256])
    assert r.stats.blocks_decompressed == 8 and r.stats.bytes_read <= 1.1 * r.stats.stored_bytes_needed
    # columns: every block holds some of them; decompressed into scratch, then copied
    lay = ParallelLayout(tp_rank=1, tp_size=2, rules={"t": ShardSpec(1)})
    r = dcp_ext.storage_reader(str(tmp_path))
    got = {"t": torch.zeros(512, 32)}
    dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay))
    assert torch.equal(got["t"], t[:, 32:]) and r.stats.blocks_direct == 0


def test_checksums_off_still_round_trips(tmp_path):
    t = _compressible(torch.int32, (256, 64), 8)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path), compression="zstd", checksum=False,
                                                             checksum_block_size=BLOCK))
    r = dcp_ext.storage_reader(str(tmp_path))
    got = {"t": torch.zeros(256, 64, dtype=torch.int32)}
    dcp.load(got, storage_reader=r)
    assert torch.equal(got["t"], t) and r.stats.blocks_verified == 0 and r.stats.blocks_decompressed == 16


def _save_one(tmp_path, **opts):
    t = _compressible(torch.float32, (256, 64), 9)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path), compression="zstd",
                                                             checksum_block_size=BLOCK, **opts))
    item = _manifest(tmp_path)["items"][0]
    return t, item, tmp_path / item["file"]


def test_a_corrupt_compressed_block_is_named(tmp_path):
    t, item, data = _save_one(tmp_path)
    ft = FrameTable.from_json(item["compression"])
    start, size = ft.block_frame(5)
    raw = bytearray(data.read_bytes())
    raw[item["offset"] + start + size - 2] ^= 0xFF  # inside the compressed bytes of block 5
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(256, 64)}, storage_reader=dcp_ext.storage_reader(
        str(tmp_path))))
    # zstd either fails to decode the damaged frame or yields bytes that fail the block's crc32c
    assert "CorruptCheckpointError" in msg and f"{tmp_path}/__0_0.distcp" in msg and "t chunk [0, 0]" in msg
    assert ("compressed block 5, bytes" in msg and "checksum mismatch" in msg) or \
        "compressed data block 5 of t chunk [0, 0]" in msg
    rep = verify_checkpoint(str(tmp_path))
    assert not rep.ok and "__0_0.distcp" in rep.errors[0] and "t chunk [0, 0]" in rep.errors[0]


@pytest.mark.parametrize("algo", ["xxh3_64", "crc32c"])
def test_a_flipped_byte_in_a_block_stored_raw_fails_its_checksum(tmp_path, algo):
    """A block stored as a raw zstd frame still decodes when a data byte flips: the block's
    checksum (either algorithm; loaded with the default configuration) catches it, the error
    names the block, and a ranged load of other blocks is unaffected."""
    mixed = torch.cat([torch.zeros(128, 64), P.filled(torch.float32, (128, 64), 4)])  # blocks 8-15 raw
    dcp.save({"mixed": mixed}, storage_writer=dcp_ext.storage_writer(
        str(tmp_path), compression="zstd", checksum_block_size=BLOCK, checksum_algorithm=algo))
    item = _manifest(tmp_path)["items"][0]
    ft = FrameTable.from_json(item["compression"])
    start, size = ft.block_frame(12)
    assert size == 4096 + 12  # stored raw: the frame ends with the block's bytes
    data = tmp_path / item["file"]
    raw = bytearray(data.read_bytes())
    raw[item["offset"] + start + size - 2] ^= 0x01
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"mixed": torch.zeros(256, 64)},
                                      storage_reader=dcp_ext.storage_reader(str(tmp_path))))
    at = item["offset"] + start
    assert f"checksum mismatch in {tmp_path}/{item['file']} (compressed block 12, bytes {at}-{at + size}, " \
           f"decompressed) for mixed chunk [0, 0]" in msg, msg
    assert verify_checkpoint(str(tmp_path)).errors == [
        f"{item['file']}: mixed chunk [0, 0] fails its checksum at data bytes {12 * 4096}-{13 * 4096}"]
    from tests.test_corruption import BoxPlanner

    clear = BoxPlanner("mixed", 0, 64, 64)  # rows 0-63: blocks 0-3
    dcp.load({"mixed": torch.zeros(256, 64)}, storage_reader=dcp_ext.storage_reader(str(tmp_path)), planner=clear)
    assert torch.equal(clear.out, mixed[:64])


def test_a_damaged_frame_header_is_named(tmp_path):
    t, item, data = _save_one(tmp_path)
    start, _ = FrameTable.from_json(item["compression"]).block_frame(3)
    raw = bytearray(data.read_bytes())
    raw[item["offset"] + start:item["offset"] + start + 4] = b"XXXX"  # not a zstd frame any more
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(256, 64)}, storage_reader=dcp_ext.storage_reader(
        str(tmp_path))))
    assert f"{tmp_path}/__0_0.distcp: compressed data block 3 of t chunk [0, 0] (bytes " in msg
    assert "is damaged: not a zstd frame" in msg
    rep = verify_checkpoint(str(tmp_path))
    assert rep.errors == ["__0_0.distcp: compressed data block 3 of t chunk [0, 0] is damaged: not a zstd frame "
                          + rep.errors[0].split("not a zstd frame ", 1)[1]]


def test_byte_shuffle_shrinks_floats_and_needs_our_registry_for_stock(tmp_path):
    """compression_shuffle groups the bytes of each element position: trained-like floats shrink
    more; stock's reader refuses the items without dcp_ext.extension_registry() and reads them with it."""
    g = torch.Generator().manual_seed(3)
    state = {"w": (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16),
             "v": torch.randn(512, 128, generator=g).abs() * 1e-3 + 1e-3, "c": torch.arange(40000, dtype=torch.int64)}
    stored = {}
    for sh in (False, True):
        url = str(tmp_path / f"s{int(sh)}")
        w = dcp_ext.storage_writer(url, compression="zstd", compression_shuffle=sh, checksum_block_size="64KiB")
        dcp.save(state, storage_writer=w)
        stored[sh] = w.stats.bytes_written
        r = dcp_ext.storage_reader(url)
        got = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(got, storage_reader=r)
        assert all(torch.equal(got[k], v) for k, v in state.items())
        assert r.stats.blocks_decompressed == r.stats.blocks_direct > 0  # unshuffled straight into place
        assert verify_checkpoint(url).ok
    assert stored[True] < 0.93 * stored[False]
    items = {it["index"][0]: it for it in _manifest(tmp_path / "s1")["items"]}
    assert items["w"]["transforms"] == ["dcp_ext.zstd_shuffle2/1"] and items["w"]["compression"]["shuffle"] == 2
    assert items["v"]["transforms"] == ["dcp_ext.zstd_shuffle4/1"]
    url = str(tmp_path / "s1")
    msg = error_text(lambda: dcp.load({k: torch.zeros_like(v) for k, v in state.items()},
                                      storage_reader=FileSystemReader(url)))
    assert "Unknown extension name='dcp_ext.zstd_shuffle" in msg
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(got, storage_reader=FileSystemReader(url, _extension_registry=dcp_ext.extension_registry()))
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # a quarter of the rows, resharded: only its blocks, unshuffled
    lay = ParallelLayout(tp_rank=3, tp_size=4, rules={"*": ShardSpec(0)})
    r = dcp_ext.storage_reader(url)
    got = {k: torch.zeros_like(v.chunk(4)[3]) for k, v in state.items()}
    dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay))
    assert all(torch.equal(got[k], v.chunk(4)[3]) for k, v in state.items())
    assert r.stats.bytes_read <= 1.1 * r.stats.stored_bytes_needed


def test_a_corrupt_shuffled_block_is_named(tmp_path):
    t, item, data = _save_one(tmp_path, compression_shuffle=True)
    ft = FrameTable.from_json(item["compression"])
    start, size = ft.block_frame(2)
    raw = bytearray(data.read_bytes())
    raw[item["offset"] + start + size - 3] ^= 0x10
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(256, 64)}, storage_reader=dcp_ext.storage_reader(
        str(tmp_path))))
    assert "CorruptCheckpointError" in msg and "t chunk [0, 0]" in msg and (
        "compressed block 2, bytes" in msg or "compressed data block 2 of t" in msg)
    assert not verify_checkpoint(str(tmp_path)).ok


def test_tiered_saves_compress_both_tiers(tmp_path):
    """With cache= the fast tier is written compressed and the durable copy is the same bytes."""
    t = _compressible(torch.float32, (256, 64), 13)
    durable, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(durable, cache=fast, compression="zstd",
                                                             checksum_block_size=BLOCK))
    dcp_ext.wait_persisted()
    for reader in (dcp_ext.storage_reader(durable, cache=fast), dcp_ext.storage_reader(durable)):
        got = {"t": torch.zeros(256, 64)}
        dcp.load(got, storage_reader=reader)
        assert torch.equal(got["t"], t)
    assert _manifest(tmp_path / "durable")["items"][0]["compression"]["codec"] == "zstd"
    assert verify_checkpoint(durable).ok


# ------------------------------------------------------------------------------------ config
def test_compression_is_a_config_key_like_every_other(tmp_path):
    assert dcp_ext.load_config().compression is None  # off by default
    cfg = dcp_ext.load_config(environ={"DCP_EXT_COMPRESSION": "zstd", "DCP_EXT_COMPRESSION_LEVEL": "7",
                                       "DCP_EXT_COMPRESSION_MIN_RATIO": "1.3", "DCP_EXT_COMPRESSION_SHUFFLE": "1"})
    assert (cfg.compression, cfg.compression_level, cfg.compression_min_ratio, cfg.compression_shuffle) == (
        "zstd", 7, 1.3, True)
    f = tmp_path / "c.toml"
    f.write_text('compression = "zstd"\ncompression_level = -5\n')
    cfg = dcp_ext.load_config(config=str(f), environ={})
    assert (cfg.compression, cfg.compression_level) == ("zstd", -5)
    assert dcp_ext.load_config(compression="none", environ={}).compression is None
    w = dcp_ext.storage_writer(str(tmp_path / "ck"), config=str(f))
    dcp.save({"t": torch.zeros(64, 64)}, storage_writer=w)
    assert w.stats.compression.items_compressed == 1


@pytest.mark.parametrize("opts, message", [
    ({"compression": "lz4"}, "compression: must be one of 'zstd' or None, got 'lz4'"),
    ({"compression": 3}, "compression: expected a string, got 3"),
    ({"compression_level": 23}, "compression_level: must be in -131072..22 (zstd), got 23"),
    ({"compression_min_ratio": 0.5}, "compression_min_ratio: must be >= 1.0, got 0.5"),
    ({"compression_shuffle": "yes"}, "compression_shuffle: expected true/false, got 'yes'"),
    ({"compression": "zstd", "checksum_block_size": "128MiB"},
     "checksum_block_size: must be <= 64MiB with compression (each block is one zstd frame), got 134217728"),
])
def test_bad_compression_options_are_named(opts, message):
    assert message in error_text(lambda: dcp_ext.load_config(environ={}, **opts))


def test_compression_and_stock_extensions_do_not_mix(tmp_path):
    msg = error_text(lambda: dcp_ext.storage_writer(str(tmp_path), compression="zstd", _extensions=[ZStandard()]))
    assert "compression='zstd' and _extensions (stock stream transforms) cannot be combined" in msg


def test_missing_zstandard_names_the_extra(tmp_path, monkeypatch):
    t, _item, _data = _save_one(tmp_path / "ours")
    dcp.save({"t": t}, storage_writer=Z.stock_writer("zstd", str(tmp_path / "stock"), None))
    import torch.distributed.checkpoint._extension as ext

    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(ext, "zstandard", None)
    monkeypatch.setattr(ext, "pyzstd", None)
    msg = error_text(lambda: dcp_ext.storage_writer(str(tmp_path / "new"), compression="zstd"))
    assert "MissingDependencyError" in msg and "pip install 'dcp-ext[zstd]'" in msg
    for where in ("ours", "stock"):
        msg = error_text(lambda: dcp.load({"t": torch.zeros(256, 64)},
                                          storage_reader=dcp_ext.storage_reader(str(tmp_path / where))))
        assert "MissingDependencyError" in msg and "pip install 'dcp-ext[zstd]'" in msg, msg


# ------------------------------------------------------------ stock formats, one process
def test_stock_formats_on_memory_full_and_ranged():
    """Stock FsspecWriter on memory:// in every 2.13 format; ours loads them whole and as a
    quarter of each tensor's rows (ranged, except stock-compressed items: read whole)."""
    full = Z.full_state(21)
    root = f"memory://stock-{uuid.uuid4().hex[:8]}"
    for fmt in Z.FORMATS:
        state = {**full, "extra": {"step": 7, "name": fmt}}
        dcp.save(state, storage_writer=Z.stock_writer(fmt, f"{root}/{fmt}", None))
        r = dcp_ext.storage_reader(f"{root}/{fmt}")
        got = {**{k: torch.zeros_like(v) for k, v in full.items()}, "extra": {"step": 0, "name": ""}}
        dcp.load(got, storage_reader=r)
        assert _same(got, state) == [] and got["extra"] == {"step": 7, "name": fmt}
        lay = ParallelLayout(tp_rank=2, tp_size=4, rules={"*": ShardSpec(0)})
        r = dcp_ext.storage_reader(f"{root}/{fmt}")
        got = {k: torch.zeros_like(v.chunk(4)[2]) for k, v in full.items()}
        dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay, strict=False))  # tensors only
        assert all(torch.equal(got[k], v.chunk(4)[2]) for k, v in full.items()), fmt
        if fmt in ("safetensors", "both"):  # raw bytes located from the header: a quarter (+ one 4 KiB probe)
            assert r.stats.bytes_read <= r.stats.bytes_needed + 4096 + 8, (fmt, r.stats)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_stock_records_are_read_by_ranges_where_their_bytes_are_the_values(tmp_path, where):
    """Stock's default format has no data offsets: for a partial read of a large record we read its
    zip directory and pickle (not executed) and fetch only the rows needed, unless the record's
    bytes are not the values (a transposed view, a conj view), which are read whole like stock."""
    g = torch.Generator().manual_seed(12)
    full = {"f32": torch.randn(512, 256, generator=g), "bf16": torch.randn(512, 512, generator=g).to(torch.bfloat16),
            "u16": torch.randint(0, 60000, (512, 512), generator=g, dtype=torch.int32).to(torch.uint16),  # pickle v3
            "cplx": torch.randn(512, 64, dtype=torch.complex64, generator=g),
            "transposed": torch.randn(256, 512, generator=g).t(),  # stock saves the view: bytes in column order
            "conj": torch.randn(512, 64, dtype=torch.complex64, generator=g).conj()}  # stock keeps the bit in the pickle
    url = str(tmp_path / "ck") if where == "local" else f"memory://rec-{uuid.uuid4().hex[:8]}"
    dcp.save(dict(full), storage_writer=Z.stock_writer("default", url, None))
    lay = ParallelLayout(tp_rank=1, tp_size=4, rules={"*": ShardSpec(0)})
    r = dcp_ext.storage_reader(url)
    got = {k: torch.zeros_like(v.chunk(4)[1]) for k, v in full.items()}
    dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay))
    assert all(torch.equal(got[k], v.chunk(4)[1].resolve_conj()) for k, v in full.items())
    ranged = {k.fqn for k, loc in r.locations.items() if loc.data_offset is not None}
    assert ranged == {"f32", "bf16", "u16", "cplx"}
    whole = sum(r.locations[k].length for k in r.locations if k.fqn in ("transposed", "conj"))
    quarter = sum(v.numel() * v.element_size() // 4 for k, v in full.items() if k in ranged)
    assert r.stats.bytes_read <= whole + quarter + 6 * 2 * 8192  # + two 8 KiB probes per partial record
    # a whole-tensor load needs no probe: every record read whole, as before
    r = dcp_ext.storage_reader(url)
    got = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(got, storage_reader=r)
    assert all(torch.equal(got[k], v.resolve_conj()) for k, v in full.items())
    assert all(loc.data_offset is None for loc in r.locations.values())


@needs_safetensors_format
def test_stock_formats_stock_cannot_read_itself_but_we_can(tmp_path):
    """Stock's SAFETENSORS format is not loadable by stock's own FileSystemReader in 2.13."""
    Z_full = Z.full_state(5)
    dcp.save(dict(Z_full), storage_writer=Z.stock_writer("safetensors", str(tmp_path), None))
    assert error_text(lambda: dcp.load({k: torch.zeros_like(v) for k, v in Z_full.items()},
                                       storage_reader=FileSystemReader(str(tmp_path))))
    got = {k: torch.zeros_like(v) for k, v in Z_full.items()}
    dcp.load(got, storage_reader=dcp_ext.storage_reader(str(tmp_path)))
    assert all(torch.equal(got[k], v) for k, v in Z_full.items())


def test_unknown_stream_transforms_are_named_and_a_registry_reads_them(tmp_path):
    url = str(tmp_path / "ck")
    state = {"t": torch.arange(1000.0), "o": [1, 2]}
    dcp.save(state, storage_writer=Z.stock_writer("default", url, None).__class__(url, _extensions=[P.ZlibTransform()]))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(1000), "o": None}, storage_reader=dcp_ext.storage_reader(url)))
    assert "UnsupportedFormatError" in msg and "uses the stream transform(s) ['test.zlib/1'], which this reader does " \
        "not know" in msg and "pass _extension_registry=" in msg
    got = {"t": torch.zeros(1000), "o": None}
    dcp.load(got, storage_reader=dcp_ext.storage_reader(url, _extension_registry=P.zlib_registry()))
    assert torch.equal(got["t"], state["t"]) and got["o"] == [1, 2]
    msg = error_text(lambda: dcp_ext.storage_reader(url, _extension_registry={"test.zlib": 1}))
    assert "_extension_registry: expected a torch.distributed.checkpoint._extension.ExtensionRegistry, got dict" in msg
    msg = error_text(lambda: dcp_ext.storage_reader(url, cache=str(tmp_path / "fast"),
                                                    _extension_registry=P.zlib_registry()))
    assert "_extension_registry is not supported by tiered readers" in msg


def test_our_extensions_items_are_read_whole_and_verified(tmp_path):
    """Our writer's _extensions items (stock's way): read back by us, checksums of the stored bytes verified."""
    url = str(tmp_path / "ck")
    t = torch.arange(5000.0)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(url, _extensions=[ZStandard()]))
    r = dcp_ext.storage_reader(url)
    got = {"t": torch.zeros(5000)}
    dcp.load(got, storage_reader=r)
    assert torch.equal(got["t"], t) and r.stats.blocks_verified == 0  # whole-record path checks `rest` + blocks
    data = tmp_path / "ck" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(5000)}, storage_reader=dcp_ext.storage_reader(url)))
    assert "CorruptCheckpointError" in msg and "checksum mismatch" in msg and "for t chunk [0]" in msg


def test_a_file_in_no_known_format_is_named(tmp_path):
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(100.0)}, storage_writer=Z.stock_writer("default", url, None))
    data = tmp_path / "ck" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[:4] = b"XYZW"
    data.write_bytes(bytes(raw))
    msg = error_text(lambda: dcp.load({"t": torch.zeros(100)}, storage_reader=dcp_ext.storage_reader(url)))
    assert "is unreadable (it starts with b'XYZW': not a torch.save record, so not a format dcp-ext reads" in msg


def test_safetensors_with_a_dtype_we_do_not_know_is_named(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    msg = error_text(lambda: dcp_ext.storage_reader(str(tmp_path)).read_metadata())
    assert "UnsupportedFormatError" in msg and "w has the safetensors dtype 'F4', which dcp-ext cannot read" in msg


# ------------------------------------------------------------------------ HuggingFace (one process)
@needs_hf_storage
def test_hf_rank0_checkpoint_on_memory_and_incomplete_ones(tmp_path):
    full = Z.full_state(31)
    path = tmp_path / "hf"
    dcp.save(dict(full), storage_writer=dcp.HuggingFaceStorageWriter(
        str(path), fqn_to_index_mapping={k: 1 + i % 2 for i, k in enumerate(full)}))
    assert sorted(os.listdir(path)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       C.HF_INDEX_NAME]
    url = f"memory://hf-{uuid.uuid4().hex[:8]}"
    Z.upload_dir(str(path), url, {})
    lay = ParallelLayout(tp_rank=1, tp_size=2, rules={"*": ShardSpec(1)})
    r = dcp_ext.storage_reader(url)
    got = {k: torch.zeros_like(v.chunk(2, 1)[1]) for k, v in full.items()}
    dcp.load(got, storage_reader=r, planner=ReshardLoadPlanner(lay))
    assert all(torch.equal(got[k], v.chunk(2, 1)[1]) for k, v in full.items())
    md = r.read_metadata()
    assert md.state_dict_metadata["w.bf16"].properties.dtype == torch.bfloat16
    # the index names a file that is not there: refused
    (path / "model-00002-of-00002.safetensors").unlink()
    msg = error_text(lambda: dcp_ext.storage_reader(str(path)).read_metadata())
    assert "IncompleteCheckpointError" in msg and "model.safetensors.index.json names files that are not there" in msg


# -------------------------------------------------------------------------- gloo ranks
def test_stock_formats_on_local_ranks(ranks, tmp_path):
    root = str(tmp_path)
    ranks(2).run(Z.save_stock, root, None, 41, timeout=300)
    for res in ranks(2).run(Z.load_formats, root, {}, 41, timeout=300):
        for cell, got in res.items():
            fmt = cell.split("/")[0]
            assert got["bad"] == [] and got["extra"] == {"step": 7, "name": fmt}, (cell, got)
        for fmt in set(Z.FORMATS) & {"safetensors", "both"}:  # located raw bytes: each rank reads its own rows
            got = res[f"{fmt}/dim0"]                            # (+ the header); torch 2.7 writes neither
            assert got["bytes_read"] <= got["bytes_needed"] + 2 * 4096, (fmt, got)


def _object_env(kind: str, request) -> tuple[str, dict, dict]:
    server = request.getfixturevalue(f"{kind}_server")
    scheme = "s3" if kind == "s3" else "gs"
    return f"{scheme}://{server.bucket}/z17-{uuid.uuid4().hex[:10]}", server.options(), server.fsspec_options()


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_stock_formats_on_object_store_ranks(ranks, request, kind):
    root, ours, stock = _object_env(kind, request)
    ranks(2).run(Z.save_stock, root, stock, 43, timeout=600)
    for res in ranks(2).run(Z.load_formats, root, ours, 43, timeout=600):
        for cell, got in res.items():
            assert got["bad"] == [] and got["extra"]["step"] == 7, (cell, got)


@needs_hf_storage
@pytest.mark.parametrize("consolidate", [False, True], ids=["sharded", "consolidated"])
def test_hf_distributed_checkpoints_on_ranks(ranks, tmp_path, consolidate):
    path = str(tmp_path / "hf")
    ranks(2).run(Z.save_hf_distributed, path, 51, consolidate, timeout=300)
    top = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(top) == (1 if consolidate else 2)
    for res in ranks(2).run(Z.load_ours, path, {}, 51, 1, False, 1, consolidate, timeout=300):
        assert res["bad"] == [], res


@needs_hf_storage
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_hf_checkpoint_on_object_store_ranks(ranks, request, tmp_path, kind):
    url, ours, _stock = _object_env(kind, request)
    ranks(2).run(Z.save_hf_distributed, str(tmp_path / "hf"), 53, False, timeout=300)
    Z.upload_dir(str(tmp_path / "hf"), url, ours)
    for res in ranks(2).run(Z.load_ours, url, ours, 53, 0, False, timeout=600):
        assert res["bad"] == [] and res["bytes_read"] == res["bytes_needed"], res


@needs_hf_storage
def test_hf_distributed_with_a_rank_file_missing_is_refused(ranks, tmp_path):
    path = tmp_path / "hf"
    ranks(2).run(Z.save_hf_distributed, str(path), 55, False, timeout=300)
    first = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    (path / first).unlink()  # rank 0's rows are gone; no index to say so
    msg = error_text(lambda: dcp_ext.storage_reader(str(path)).read_metadata())
    assert "IncompleteCheckpointError" in msg and "the safetensors chunks of h.f16 cover 1280 of its 2560 elements (4 more tensors " \
        "likewise) (a rank's file is missing" in msg


def _one_to_four(url: str, options: dict, ranks, writer) -> list[dict]:
    full = Z.full_state(61, scale=16)
    dcp.save(dict(full), storage_writer=writer)
    return ranks(4).run(Z.load_rows, url, options, 61, 16, timeout=600)


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_compressed_checkpoint_resharded_one_to_four(ranks, request, tmp_path, backend):
    """Saved by one process, loaded row-sharded by 4 ranks: exact values, and each rank reads only
    the frames of its rows (at most 1.1x its share of the compressed bytes); stock's ZStandard
    makes every rank read every item whole."""
    if backend == "local":
        url, options = str(tmp_path / "z"), {}
    else:
        url, options, _ = _object_env(backend, request)
    res = _one_to_four(url, options, ranks, dcp_ext.storage_writer(url, compression="zstd", checksum_block_size=BLOCK,
                                                                   **options))
    doc = json.loads(dcp_ext.storage_reader(url, **options).store.read_bytes(C.MANIFEST_NAME))
    stored = sum(it["length"] for it in doc["items"])
    for r in res:
        assert r["bad"] == [] and r["blocks_verified"] > 0, r
        assert r["bytes_read"] <= 1.1 * r["stored_bytes_needed"], r
    assert sum(r["bytes_read"] for r in res) <= 1.1 * stored
    if backend == "local":
        stock_url = str(tmp_path / "stock")
        res = _one_to_four(stock_url, {}, ranks, Z.stock_writer("zstd", stock_url, None))
        whole = sum(os.path.getsize(os.path.join(stock_url, f)) for f in os.listdir(stock_url) if f.endswith(".distcp"))
        for r in res:
            assert r["bad"] == [] and r["bytes_read"] == whole, r


def test_default_block_size_keeps_resharded_reads_of_small_tensors_tight(ranks, tmp_path):
    """With the default ``checksum_block_size`` (1 MiB), tensors of 0.4-6 MiB are stored in
    128 KiB frames (a 1 MiB frame would hold a whole quarter of most of them): 4 ranks loading
    row quarters each read at most 1.1x the compressed bytes they need, and get exact values."""
    url = str(tmp_path / "z")
    full = Z.full_state(61, scale=512)
    dcp.save(dict(full), storage_writer=dcp_ext.storage_writer(url, compression="zstd"))
    doc = json.loads((tmp_path / "z" / C.MANIFEST_NAME).read_bytes())
    sizes = {it["index"][0]: it["compression"]["block_size"] for it in doc["items"] if "compression" in it}
    assert sizes and set(sizes.values()) == {128 * 1024}, sizes
    res = ranks(4).run(Z.load_rows, url, {}, 61, 512, timeout=600)
    stored = sum(it["length"] for it in doc["items"])
    for r in res:
        assert r["bad"] == [] and r["blocks_verified"] > 0, r
        assert r["bytes_read"] <= 1.1 * r["stored_bytes_needed"], r
    assert sum(r["bytes_read"] for r in res) <= 1.1 * stored
