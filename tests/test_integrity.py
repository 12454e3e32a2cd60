"""The one block-verification routine (dcp_ext.integrity.verify_range / verify_rest) and its users:
the reader's ranged reads, its whole-record reads and ``dcp-ext verify`` (issue 14, point 5)."""

from __future__ import annotations

import json
import random

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash

import dcp_ext
from dcp_ext import integrity as I
from dcp_ext.errors import CorruptCheckpointError
from dcp_ext.storage import commit as C
from dcp_ext.verify import inspect_checkpoint, verify_checkpoint
from tests.support.errors import error_text
from tests.support.torch_features import needs_rank_local_save

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

BS = 4096


#: each algorithm's definition, straight from its library (not through dcp_ext.integrity)
DEFINITIONS = {"crc32c": crc32c.crc32c, "xxh3_64": xxhash.xxh3_64_intdigest}
ALGOS = pytest.mark.parametrize("algo", sorted(DEFINITIONS))


def _checks(data: bytes, algo: str = "crc32c") -> I.ItemChecksums:
    """Block checksums computed here from the definition (``algo`` of each block), not by BlockHasher."""
    h = DEFINITIONS[algo]
    blocks = [h(data[i:i + BS]) for i in range(0, len(data), BS)]
    return I.ItemChecksums(0, len(data), BS, blocks, h(b"head" + b"tail"), I.ALGORITHMS[algo])


DATA = bytes(random.Random(3).getrandbits(8) for _ in range(5 * BS + 100))  # 6 blocks, the last partial


@ALGOS
def test_verify_range_counts_blocks_of_any_aligned_range(algo):
    c = _checks(DATA, algo)
    assert I.verify_range(c, 0, DATA) == 6
    assert I.verify_range(c, 2 * BS, DATA[2 * BS:4 * BS]) == 2
    assert I.verify_range(c, 5 * BS, DATA[5 * BS:]) == 1  # the last, partial block
    assert I.verify_range(c, 3 * BS, memoryview(bytearray(DATA))[3 * BS:]) == 3
    I.verify_rest(c, b"head", b"tail")


@ALGOS
@pytest.mark.parametrize("pos", [0, 2 * BS + 17, 5 * BS + 99], ids=["first", "middle", "last-partial"])
def test_verify_range_names_the_failing_block(pos, algo):
    c = _checks(DATA, algo)
    bad = bytearray(DATA)
    bad[pos] ^= 0x01
    k = pos // BS
    with pytest.raises(I.ChecksumMismatch) as ei:
        I.verify_range(c, 0, bad)
    e = ei.value
    assert (e.block, e.start, e.end) == (k, k * BS, min((k + 1) * BS, len(DATA)))
    assert isinstance(e, CorruptCheckpointError)
    assert str(e) == f"checksum mismatch in data bytes {k * BS}-{min((k + 1) * BS, len(DATA))} (block {k})"
    with pytest.raises(I.ChecksumMismatch):  # and from an aligned start inside the data
        I.verify_range(c, k * BS, bad[k * BS:])


@ALGOS
def test_verify_range_refuses_misuse_and_extra_data(algo):
    c = _checks(DATA, algo)
    with pytest.raises(ValueError, match="data_start 100 is not a multiple of the block size 4096"):
        I.verify_range(c, 100, DATA[100:])
    with pytest.raises(I.ChecksumMismatch) as ei:  # more data than was checksummed
        I.verify_range(c, 0, DATA + bytes(BS))
    assert ei.value.block == 5  # the partial last block no longer matches
    with pytest.raises(I.ChecksumMismatch) as ei:
        I.verify_rest(c, b"head", b"tail!")
    assert ei.value.block is None and str(ei.value) == "checksum mismatch in record headers"


def _spy(monkeypatch) -> dict[str, int]:
    """Count the calls of the shared routine from the reader and from verify."""
    calls = {"reader": 0, "verify": 0}
    from dcp_ext import verify as V
    from dcp_ext.storage import reader as R

    for mod, key in ((R, "reader"), (V, "verify")):
        def counted(*a, _key=key, **kw):
            calls[_key] += 1
            return I.verify_range(*a, **kw)

        monkeypatch.setattr(mod, "verify_range", counted)
    return calls


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@ALGOS
def test_reader_paths_and_verify_use_the_one_routine_and_agree(tmp_path, monkeypatch, algo):
    """Ranged reads, whole-record reads (bytes items, stock-style records) and dcp-ext verify all
    call integrity.verify_range, and name the same damaged block (saved with either algorithm,
    loaded and verified with the default configuration)."""
    url = str(tmp_path / "ck")
    t = torch.arange(6 * 1024, dtype=torch.float32)  # 24 KiB: 6 blocks of 4 KiB
    dcp.save({"t": t, "obj": {"blob": bytes(9000)}},
             storage_writer=dcp_ext.storage_writer(url, checksum_block_size=BS, checksum_algorithm=algo))
    calls = _spy(monkeypatch)
    out = {"t": torch.zeros_like(t), "obj": {"blob": None}}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    assert calls["reader"] >= 2 and torch.equal(out["t"], t)  # the tensor (ranged) and the bytes item (whole)
    assert verify_checkpoint(url).ok and calls["verify"] >= 2

    man = json.loads((tmp_path / "ck" / C.MANIFEST_NAME).read_text())
    assert man["checksum_algorithm"] == algo
    it = next(i for i in man["items"] if i["index"][0] == "t")
    # the recorded blocks are the algorithm's own values of the tensor's bytes
    raw = t.numpy().tobytes()
    assert it["checksums"]["blocks"] == [DEFINITIONS[algo](raw[i:i + BS]) for i in range(0, len(raw), BS)]
    _flip(tmp_path / "ck" / it["file"], it["offset"] + it["data_offset"] + 3 * BS + 5)  # block 3
    rep = verify_checkpoint(url)
    assert rep.errors == [f"{it['file']}: t chunk [0] fails its checksum at data bytes {3 * BS}-{4 * BS}"]
    base = it["offset"] + it["data_offset"]
    with pytest.raises(BaseException, match=rf"checksum mismatch in .*{it['file']} \(bytes {base + 3 * BS}-"
                                            rf"{base + 4 * BS}\) for t chunk \[0\]"):
        dcp.load({"t": torch.zeros_like(t)}, storage_reader=dcp_ext.storage_reader(url))


@needs_rank_local_save
def test_verify_and_inspect_rank_local_checkpoints(tmp_path):
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(10.0), "o": 3}, storage_writer=dcp_ext.storage_writer(url), use_collectives=False)
    info = inspect_checkpoint(url)
    # (inspect also reports the stored bytes of each tensor: its record, the 40 data bytes and a header)
    assert info["rank_local_parts"] == [0] and info["tensors"] == {"t": {"dtype": "float32", "size": [10],
                                                                         "chunks": 1,
                                                                         "bytes": info["tensors"]["t"]["bytes"]}}
    assert 40 < info["tensors"]["t"]["bytes"] < 40 + 4096
    assert info["objects"] == ["o"] and info["checksummed"] and info["has_manifest"]
    rep = verify_checkpoint(url)
    assert rep.ok and rep.items == 2 and rep.bytes_checked > 40
    _flip(tmp_path / "ck" / "__0.metadata", 10)
    assert verify_checkpoint(url).errors == [f"{url}: __0.metadata does not match __0.dcp_ext.json"]


def test_an_incomplete_location_is_refused_by_verify(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(dcp_ext.IncompleteCheckpointError, match="is an incomplete checkpoint"):
        verify_checkpoint(str(tmp_path / "ck"))


def test_item_block_size_gives_small_items_smaller_blocks():
    """An item gets >= 32 blocks where that keeps blocks >= 128 KiB; larger items keep the
    configured size; a configured size below 128 KiB is kept as it is (values worked out by hand)."""
    KiB, MiB = 1024, 1024 * 1024
    cases = [(0, MiB, 128 * KiB), (100, MiB, 128 * KiB), (2 * MiB, MiB, 128 * KiB), (4 * MiB, MiB, 128 * KiB),
             (14 * MiB, MiB, 256 * KiB), (16 * MiB, MiB, 512 * KiB), (32 * MiB, MiB, MiB), (5 * 2**30, MiB, MiB),
             (2 * MiB, 64 * KiB, 64 * KiB), (2 * MiB, 4 * KiB, 4 * KiB), (2 * MiB, 3 * MiB, 128 * KiB),
             (2 * MiB, 1_000_000, 250_000)]
    for nbytes, largest, want in cases:
        assert I.item_block_size(nbytes, largest) == want, (nbytes, largest)


def test_saved_items_record_their_own_block_size(tmp_path):
    """With the default 1 MiB ``checksum_block_size``, a 2 MiB tensor is stored in 128 KiB blocks
    (16 of them), a 12 MiB one in 256 KiB blocks (48) and a 40 MiB one in 1 MiB blocks (40); the
    checkpoint loads exactly, with stock's reader too, and a flipped byte in a small item's 9th
    block is named as that block."""
    MiB = 1024 * 1024
    state = {"small": torch.arange(MiB // 2, dtype=torch.float32),  # 2 MiB
             "mid": torch.arange(3 * MiB, dtype=torch.int32),  # 12 MiB
             "big": torch.arange(5 * MiB, dtype=torch.float64)}  # 40 MiB
    path = tmp_path / "c"
    dcp.save(state, storage_writer=dcp_ext.storage_writer(str(path)))
    doc = json.loads((path / C.MANIFEST_NAME).read_bytes())
    blocks = {it["index"][0]: (it["checksums"]["block_size"], len(it["checksums"]["blocks"])) for it in doc["items"]}
    assert blocks == {"small": (128 * 1024, 16), "mid": (256 * 1024, 48), "big": (MiB, 40)}, blocks
    for reader in (dcp_ext.storage_reader(str(path)), dcp.FileSystemReader(str(path))):
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(out, storage_reader=reader)
        assert all(torch.equal(out[k], v) for k, v in state.items())
    small = next(it for it in doc["items"] if it["index"][0] == "small")
    f = path / small["file"]
    raw = bytearray(f.read_bytes())
    raw[small["offset"] + small["data_offset"] + 8 * 128 * 1024 + 5] ^= 0x40
    f.write_bytes(bytes(raw))
    start = small["offset"] + small["data_offset"] + 8 * 128 * 1024
    msg = error_text(lambda: dcp.load({"small": torch.zeros(MiB // 2)},
                                      storage_reader=dcp_ext.storage_reader(str(path))))
    assert f"checksum mismatch in {f} (bytes {start}-{start + 128 * 1024}) for small chunk [0]" in msg, msg
