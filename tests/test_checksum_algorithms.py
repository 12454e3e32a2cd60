"""Block checksum algorithms (issue 18, point 1): xxh3_64 for new saves, crc32c still read.

The hashes are compared with each library's own definition (``crc32c.crc32c``,
``xxhash.xxh3_64_intdigest``), never with values ``dcp_ext.integrity`` computed itself.
"""

from __future__ import annotations

import io
import json
import pickle
import random

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash

import dcp_ext
from dcp_ext import integrity as I
from dcp_ext.config import load_config
from dcp_ext.errors import CorruptCheckpointError
from dcp_ext.storage import commit as C
from dcp_ext.storage import manifest as M
from dcp_ext.verify import verify_checkpoint
from tests.support.errors import error_text

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

DEFINITIONS = {"crc32c": crc32c.crc32c, "xxh3_64": xxhash.xxh3_64_intdigest}
ALGOS = pytest.mark.parametrize("algo", sorted(DEFINITIONS))
BS = 4096


def _manifest(path) -> dict:
    return json.loads((path / C.MANIFEST_NAME).read_text())


def _write_manifest(path, doc: dict) -> None:
    (path / C.MANIFEST_NAME).write_text(json.dumps(doc))


# -- the algorithms ------------------------------------------------------------------------------


@ALGOS
def test_digest_stream_and_parts_agree_with_the_library(algo):
    a = I.checksum_algorithm(algo)
    h = DEFINITIONS[algo]
    data = bytes(random.Random(1).getrandbits(8) for _ in range(10_000))
    assert a.name == algo and a.digest(data) == h(data) == a.digest(memoryview(bytearray(data)))
    s = a.stream()
    for lo, hi in ((0, 1), (1, 4097), (4097, 4097), (4097, 10_000)):
        s.update(memoryview(data)[lo:hi])
    assert s.intdigest() == h(data)
    assert a.digest_parts(data[:3], b"", data[3:]) == h(data)
    assert a.digest_parts() == h(b"")
    # pickled (ItemChecksums travel in DCP's gathered write results) as the same singleton
    assert pickle.loads(pickle.dumps(a)) is a


def test_unknown_algorithm_names_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown checksum algorithm 'md5'; known: 'crc32c', 'xxh3_64'$"):
        I.checksum_algorithm("md5")
    assert I.DEFAULT_ALGORITHM == "xxh3_64" and set(I.ALGORITHMS) == {"crc32c", "xxh3_64"}


@ALGOS
@pytest.mark.parametrize("seed", range(4))
def test_block_hasher_gives_each_blocks_checksum_whatever_the_pieces(algo, seed):
    """Pieces of any size (inside a block, across block ends, several blocks at once): every
    block's checksum is the algorithm's value of that block; the sink gets every byte in order."""
    rng = random.Random(seed)
    data = bytes(rng.getrandbits(8) for _ in range(7 * BS + rng.randrange(1, BS)))
    h = I.BlockHasher(BS, I.ALGORITHMS[algo])
    got = bytearray()
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 17, BS - 1, BS, BS + 5, 3 * BS])
        h.update(data[pos:pos + n], got.extend)
        pos += n
    want = [DEFINITIONS[algo](data[i:i + BS]) for i in range(0, len(data), BS)]
    assert h.finish() == want and bytes(got) == data


# -- configuration -------------------------------------------------------------------------------


def test_the_option_comes_from_env_and_config_files(tmp_path):
    assert load_config(environ={}).checksum_algorithm == "xxh3_64"
    assert load_config(environ={"DCP_EXT_CHECKSUM_ALGORITHM": "crc32c"}).checksum_algorithm == "crc32c"
    f = tmp_path / "c.toml"
    f.write_text('checksum_algorithm = "crc32c"\n')
    assert load_config(str(f), environ={}).checksum_algorithm == "crc32c"
    msg = error_text(lambda: load_config(environ={"DCP_EXT_CHECKSUM_ALGORITHM": "sha1"}))
    assert "checksum_algorithm: must be one of 'crc32c', 'xxh3_64', got 'sha1'" in msg


# -- checkpoints ---------------------------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(64, 100, generator=g), "b": torch.arange(7), "obj": {"blob": bytes(range(256)) * 40}}


def _zeros() -> dict:
    return {"w": torch.zeros(64, 100), "b": torch.zeros(7, dtype=torch.int64), "obj": {"blob": None}}


@ALGOS
def test_each_algorithm_saves_loads_and_verifies_with_the_default_config(tmp_path, algo):
    """Saved with the algorithm, loaded and verified with defaults: the reader follows the
    manifest. The manifest records the algorithm and the lowest version that describes it."""
    src = _state()
    dcp.save(src, storage_writer=dcp_ext.storage_writer(str(tmp_path), checksum_block_size=BS,
                                                        checksum_algorithm=algo))
    doc = _manifest(tmp_path)
    assert doc["checksum_algorithm"] == algo and doc["version"] == {"crc32c": 1, "xxh3_64": 3}[algo]
    out = _zeros()
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path)))
    assert torch.equal(out["w"], src["w"]) and torch.equal(out["b"], src["b"]) and out["obj"] == src["obj"]
    # stock's reader ignores our checksums (they are only in our manifest)
    stock = _zeros()
    dcp.load(stock, storage_reader=dcp.FileSystemReader(str(tmp_path)))
    assert torch.equal(stock["w"], src["w"]) and stock["obj"] == src["obj"]
    rep = verify_checkpoint(str(tmp_path))
    assert rep.ok and rep.items == 3 and rep.unchecked_items == 0
    # a damaged header byte of w's record is found by the record-headers check (verify_rest)
    it = next(i for i in doc["items"] if i["index"][0] == "w")
    f = tmp_path / it["file"]
    raw = bytearray(f.read_bytes())
    raw[it["offset"] + 3] ^= 0x04
    f.write_bytes(bytes(raw))
    assert verify_checkpoint(str(tmp_path)).errors == [f"{it['file']}: record header of w chunk [0, 0] is corrupt"]


@ALGOS
def test_the_record_headers_checksum_is_the_algorithms_value(tmp_path, algo):
    """``rest`` covers the record's bytes outside its data region: head, then tail."""
    t = torch.arange(3000, dtype=torch.float32)
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(str(tmp_path), checksum_algorithm=algo))
    (it,) = _manifest(tmp_path)["items"]
    rec = (tmp_path / it["file"]).read_bytes()[it["offset"]:it["offset"] + it["length"]]
    d0, d1 = it["data_offset"], it["data_offset"] + it["data_length"]
    assert rec[d0:d1] == t.numpy().tobytes()
    assert it["checksums"]["rest"] == DEFINITIONS[algo](rec[:d0] + rec[d1:])


def test_an_unknown_algorithm_in_a_manifest_is_refused_by_name(tmp_path):
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(str(tmp_path)))
    doc = _manifest(tmp_path)
    doc["checksum_algorithm"] = "blake3"
    _write_manifest(tmp_path, doc)
    want = ("the checkpoint's block checksums use the algorithm 'blake3', which this dcp-ext does not know "
            "(known: crc32c, xxh3_64); upgrade dcp-ext")
    with pytest.raises(CorruptCheckpointError, match=r"\.dcp_ext\.json: " + want.replace("(", r"\(").replace(")", r"\)")):
        dcp_ext.storage_reader(str(tmp_path)).read_metadata()
    assert want in error_text(lambda: dcp.load(_zeros(), storage_reader=dcp_ext.storage_reader(str(tmp_path))))
    assert want in error_text(lambda: verify_checkpoint(str(tmp_path)))


def test_a_reader_that_knows_only_crc32c_refuses_xxh3_by_version(tmp_path, monkeypatch):
    """What a dcp-ext release before xxh3 (manifest versions up to 2) does with a new checkpoint:
    refuse it by version instead of failing every block. crc32c checkpoints it still reads."""
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(str(tmp_path / "x")))
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(str(tmp_path / "c"), checksum_algorithm="crc32c"))
    monkeypatch.setattr(M, "FORMAT_VERSION", 2)
    msg = error_text(lambda: dcp_ext.storage_reader(str(tmp_path / "x")).read_metadata())
    assert "manifest version 3 is newer than this dcp-ext understands (2); upgrade dcp-ext" in msg
    out = _zeros()
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / "c")))
    assert torch.equal(out["w"], _state()["w"])


def test_the_version_rule():
    assert M.FORMAT_VERSION == 3 and M.BASE_VERSION == 1
    assert [M.manifest_version(c, a) for c, a in ((False, None), (False, "crc32c"), (True, "crc32c"),
                                                  (True, None), (False, "xxh3_64"), (True, "xxh3_64"))] == \
        [1, 1, 2, 2, 3, 3]


def test_a_manifest_without_an_algorithm_but_with_checksums_is_read_as_crc32c(tmp_path):
    """crc32c was the only algorithm before the name mattered to readers."""
    dcp.save(_state(), storage_writer=dcp_ext.storage_writer(str(tmp_path), checksum_algorithm="crc32c",
                                                             checksum_block_size=BS))
    doc = _manifest(tmp_path)
    doc["checksum_algorithm"] = None
    _write_manifest(tmp_path, doc)
    out = _zeros()
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path)))
    assert torch.equal(out["w"], _state()["w"]) and verify_checkpoint(str(tmp_path)).ok


def test_encode_refuses_items_hashed_by_another_algorithm():
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    loc = M.ItemLocation("f", 0, 4, 0, 4, I.ItemChecksums(0, 4, BS, [1], 0, I.CRC32C))
    with pytest.raises(ValueError, match="x: its block checksums are crc32c, the manifest says xxh3_64"):
        M.encode_manifest(Metadata({}), {MetadataIndex("x", None): loc}, "id", 0, "xxh3_64")


@ALGOS
def test_bytes_and_transformed_records_carry_the_algorithm(algo):
    """Records without bytes outside their data region hash the empty string as ``rest``."""
    from dcp_ext.storage.records import write_bytes_record

    class Sink:
        def __init__(self):
            self.buf = bytearray()

        def tell(self):
            return len(self.buf)

        def write(self, b):
            self.buf += b

    out = Sink()
    data = bytes(range(256)) * 50
    loc = write_bytes_record(out, "f", io.BytesIO(data), BS, I.ALGORITHMS[algo])
    c = loc.checksums
    assert c.algorithm is I.ALGORITHMS[algo] and c.rest == DEFINITIONS[algo](b"")
    assert c.blocks == [DEFINITIONS[algo](data[i:i + BS]) for i in range(0, len(data), BS)]
    I.verify_rest(c, b"", b"")
    assert I.verify_range(c, 0, out.buf) == 4
