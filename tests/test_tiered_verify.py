"""Files received by a tiered restore are checked against the checkpoint's own checksums before
they are published or vouched for (restore.verify_received): a rebuilt replica from a copy with a
flipped bit gets no marker and its bytes are not published; a file restored for a load from a bad
copy is refused and the load takes the next good copy or fails with a clear error, never wrong
values. Two real gloo ranks, one per fake node (tests/tiered_fault_fns.py's corrupt_* functions:
one 64 KiB tensor per rank in 4 KiB checksum blocks)."""

from __future__ import annotations

import os
import shutil

import torch

from dcp_ext.errors import CorruptCheckpointError
from dcp_ext.storage.commit import METADATA_NAME, REPLICA_MARKER
from dcp_ext.storage.manifest import decode_manifest
from dcp_ext.tiered.exchange import FileSink
from dcp_ext.tiered.faststore import FastStore
from dcp_ext.tiered.restore import verify_received
from tests import tiered_fault_fns as F


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))  # one bit


def _exact(values: dict, ref: dict) -> bool:
    return set(values) == set(ref) and all(torch.equal(torch.tensor(values[k]), v) for k, v in ref.items())


def _record_offset(fast_dir: str, fqn: str) -> int:
    """The file offset of ``fqn``'s record (its torch.save zip header comes first)."""
    with open(os.path.join(fast_dir, ".dcp_ext.json"), "rb") as f:
        m = decode_manifest(f.read(), fast_dir)
    loc = next(loc for idx, loc in m.locations.items() if idx.fqn == fqn)
    assert loc.data_offset > 8
    return loc.offset


def _save(pool, tmp_path) -> tuple[str, str, list[str]]:
    root, base = str(tmp_path / "ckpt"), str(tmp_path / "nodes")
    dirs = [d["fast_dir"] for d in pool.run(F.corrupt_save, root, base)]
    return root, base, dirs


def _lose_node1(base: str) -> None:
    shutil.rmtree(os.path.join(base, "node1"))


def _load_ok(pool, root: str, base: str, expect_tier: str = "fast") -> list[dict]:
    out = pool.run(F.corrupt_load, root, base)
    for r, o in enumerate(out):
        assert "error" not in o, (r, o)
        assert _exact(o["values"], F.corrupt_state(r)), (r, o["values"])
        assert o["tier"] == expect_tier, (r, o["tier"])
    return out


def _no_leftovers(d: str) -> None:
    """Nothing published and no temporary file left behind in the replica directory ``d``."""
    left = os.listdir(d) if os.path.isdir(d) else []
    assert left == [], left


def test_rebuilt_replica_from_a_corrupt_source_is_not_published_nor_marked(ranks, tmp_path):
    pool = ranks(2)
    root, base, dirs = _save(pool, tmp_path)
    own0 = os.path.join(dirs[0], "__0_0.distcp")
    rep0 = os.path.join(dirs[1], "replica_of_rank0")  # node 1 keeps rank 0's replica
    header = _record_offset(dirs[0], "x0") + 4
    cases = [  # (where the bit flips, what the refusal names, whether rank 0's own load reads those bytes)
        # the record's zip header: a load reads only data blocks, so rank 0 still loads from its own
        # copy, but a replica is a whole file (what `dcp-ext verify` and a stock reader check): refused
        (header, "record header of x0 chunk [0, 0] is corrupt", False),
        (F.block_offset(dirs[0], "x0", 0), "x0 chunk [0, 0] fails its checksum at data bytes 0-4096",
         True),
        (F.block_offset(dirs[0], "x0", 11) + 100,
         "x0 chunk [0, 0] fails its checksum at data bytes 45056-49152", True),
    ]
    for offset, where, read_by_load in cases:
        _lose_node1(base)  # node 1 replaced: rank 0's replica is rebuilt there from rank 0's own copy
        _flip(own0, offset)  # ... which has a flipped bit on node 0's disk
        out = _load_ok(pool, root, base)  # the load itself reads x0 from the durable copy (the same save)
        want = (f"rank 1: the copy of __0_0.distcp received from rank 0 (__0_0.distcp on its node) does not match "
                f"the checkpoint's checksums: {where}; it was not published and the replica it belongs to "
                f"(replica_of_rank0) was not rebuilt")
        for r in range(2):  # every rank hears of the failed transfer, in the gathered outcome
            assert any(line == f"rank {r}: restoring __0_0.distcp from rank 0 failed: {want}"
                       for line in out[r]["logs"]), (r, want, out[r]["logs"])
            assert not any("rebuilt the replica of rank 0" in line for line in out[r]["logs"]), out[r]["logs"]
        assert not os.path.exists(os.path.join(rep0, REPLICA_MARKER))
        _no_leftovers(rep0)
        if not read_by_load:
            assert out[0]["sources"]["__0_0.distcp"].startswith("fast tier on this node"), out[0]["sources"]
            _flip(own0, offset)  # the bit flipped back: the next case's damage is the only one
            continue
        assert out[0]["sources"]["__0_0.distcp"].startswith("durable tier"), out[0]["sources"]
        # node 1's own file came from rank 0's (good) replica of rank 1, and its commit is back
        assert "(its replica of rank 1)" in out[1]["sources"]["__1_0.distcp"], out[1]["sources"]
        assert os.path.exists(os.path.join(dirs[1], METADATA_NAME))
        # node 0 got a good copy of its file back (from the durable copy, checked before it was published)
        assert any(line == "rank 0: put __0_0.distcp back into the fast tier from the durable copy"
                   for line in out[0]["logs"]), out[0]["logs"]

    # the source is good now: the next load rebuilds the replica, vouched for ...
    out = _load_ok(pool, root, base)
    assert any("rank 1: rebuilt the replica of rank 0 (1 file(s))" in line for line in out[1]["logs"]), out[1]["logs"]
    assert os.path.exists(os.path.join(rep0, REPLICA_MARKER))
    assert sorted(os.listdir(rep0)) == sorted([REPLICA_MARKER, "__0_0.distcp"])
    # ... and it holds the right bytes: with node 0's fast tier and the durable data gone, rank 0
    # loads its values exactly from that replica
    shutil.rmtree(os.path.join(base, "node0"))
    for f in os.listdir(os.path.join(root, "step")):
        if f.endswith(".distcp"):
            os.unlink(os.path.join(root, "step", f))
    out = _load_ok(pool, root, base)
    assert ("restored over the process group from rank 1 on node 1 (its replica of rank 0)"
            in out[0]["sources"]["__0_0.distcp"]), out[0]["sources"]
    assert not any("failed" in line for o in out for line in o["logs"]), [o["logs"] for o in out]


def test_file_restored_for_a_load_from_a_corrupt_copy_is_refused(ranks, tmp_path):
    pool = ranks(2)
    root, base, dirs = _save(pool, tmp_path)
    rep1 = os.path.join(dirs[0], "replica_of_rank1", "__1_0.distcp")  # node 0 keeps rank 1's replica
    # node 1 lost its fast tier; the only fast copy of rank 1's file has a flipped bit in block 5
    _lose_node1(base)
    _flip(rep1, F.block_offset(dirs[0], "x1", 5) + 7)  # (node 0 holds the same manifest)
    out = _load_ok(pool, root, base)  # rank 1 reads from the durable copy (the same save): exact values
    want = ("rank 1: the copy of __1_0.distcp received from rank 0 (replica_of_rank1/__1_0.distcp on its node) "
            "does not match the checkpoint's checksums: x1 chunk [0, 0] fails its checksum at data bytes 20480-24576; "
            "it was not published")
    assert f"rank 1: restoring __1_0.distcp from rank 0 failed: {want}" in out[1]["logs"], out[1]["logs"]
    assert out[1]["sources"]["__1_0.distcp"].startswith("durable tier"), out[1]["sources"]
    # rank 0's replica on node 1 was rebuilt from rank 0's good copy
    assert os.path.exists(os.path.join(dirs[1], "replica_of_rank0", REPLICA_MARKER))

    # the same, with the durable data gone too: no good copy is left, and the load fails on rank 1
    # with a CorruptCheckpointError naming the file (the bad bytes are never loaded)
    _lose_node1(base)
    for f in os.listdir(os.path.join(root, "step")):
        if f.endswith(".distcp"):
            os.unlink(os.path.join(root, "step", f))
    out = pool.run(F.corrupt_load, root, base)
    want = (f"{CorruptCheckpointError.__module__}.CorruptCheckpointError: {root}/step: no good copy of __1_0.distcp "
            f"is left: the fast-tier copies failed their checksums or were lost, and reading the durable copy failed "
            f"too: {root}/step/__1_0.distcp is missing: the checkpoint is damaged (while reading x1)")
    for o in out:  # every rank's load fails with rank 1's error (DCP reports it everywhere)
        assert "error" in o and o["error"].startswith("CheckpointException"), o
        assert want in o["error"], (want, o["error"])
    assert out[1]["values"] == {"x1": torch.zeros(64, 256).tolist()}  # nothing wrong was loaded
    assert not os.path.exists(os.path.join(dirs[1], "__1_0.distcp"))  # the bad bytes were not published
    if os.path.isdir(dirs[1]):  # and no temporary file was left behind
        assert not [f for f in os.listdir(dirs[1]) if f.endswith(".part")], os.listdir(dirs[1])


def test_a_bad_copy_from_another_node_and_a_bad_durable_file_are_not_put_in_the_fast_tier(ranks, tmp_path):
    """Rank 0's own copy and node 1's replica of it are both damaged (data blocks), and the durable
    file's record header too: rank 0 refuses the replica on arrival, loads its data blocks from
    the durable copy (exact values: a load reads no record header), and does not put the durable
    file back into its fast tier, since the whole file fails the checkpoint's checksums."""
    pool = ranks(2)
    root, base, dirs = _save(pool, tmp_path)
    own0 = os.path.join(dirs[0], "__0_0.distcp")
    _flip(own0, F.block_offset(dirs[0], "x0", 0))
    _flip(os.path.join(dirs[1], "replica_of_rank0", "__0_0.distcp"), F.block_offset(dirs[0], "x0", 2) + 1)
    _flip(os.path.join(root, "step", "__0_0.distcp"), _record_offset(dirs[0], "x0") + 4)
    out = _load_ok(pool, root, base)
    assert out[0]["sources"]["__0_0.distcp"].startswith("durable tier"), out[0]["sources"]
    logs = out[0]["logs"]
    assert ("rank 0: restoring __0_0.distcp from rank 1 failed: rank 0: the copy of __0_0.distcp received from rank 1 "
            "(replica_of_rank0/__0_0.distcp on its node) does not match the checkpoint's checksums: x0 chunk [0, 0] "
            "fails its checksum at data bytes 8192-12288; it was not published") in logs, logs
    assert ("rank 0: could not put __0_0.distcp back into the fast tier: rank 0: the copy of __0_0.distcp received "
            "from the durable copy does not match the checkpoint's checksums: record header of x0 chunk [0, 0] "
            "is corrupt; it was not published") in logs, logs
    assert not os.path.exists(own0)  # the bad own copy was removed and nothing replaced it
    assert not [f for f in os.listdir(dirs[0]) if f.endswith(".part")], os.listdir(dirs[0])


def test_verify_received_names_the_file_item_block_and_ranks(tmp_path):
    """The check itself, on one process: a good copy passes, a copy with a flipped bit (first
    and last block) is refused with the text the transfers report, a short copy too."""
    from dcp_ext.config import load_config
    import dcp_ext
    import torch.distributed.checkpoint as dcp

    url = str(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(3)
    ref = {"w": torch.randn(16, 256, generator=g)}  # 16 KiB: 4 blocks of 4 KiB
    dcp.save(ref, storage_writer=dcp_ext.storage_writer(url, checksum_block_size="4KiB"), no_dist=True)
    with open(os.path.join(url, ".dcp_ext.json"), "rb") as f:
        m = decode_manifest(f.read(), url)
    items = [(idx, loc) for idx, loc in m.locations.items() if loc.relative_path == "__0_0.distcp"]
    (_idx, loc), = items
    with open(os.path.join(url, "__0_0.distcp"), "rb") as f:
        good = f.read()
    fast = FastStore(str(tmp_path / "fast"), load_config())
    os.makedirs(fast.root)
    NAME, SRC = "__0_0.distcp", "rank 2 (replica_of_rank0/__0_0.distcp on its node)"  # a replica rebuilt on rank 5

    def received(data: bytes, size: int | None = None):
        sink = FileSink(fast, [("got.distcp", len(data) if size is None else size)], publish=False)
        sink.write(memoryview(data))
        return sink, sink.done[0] if sink.done else None

    sink, f = received(good)
    assert verify_received(fast, f.tmp, NAME, items, 5, SRC, "replica_of_rank0") is None
    sink.abort()
    for block, start in ((0, 0), (3, 12288)):
        bad = bytearray(good)
        bad[loc.offset + loc.data_offset + start + 99] ^= 0x10
        sink, f = received(bytes(bad))
        assert verify_received(fast, f.tmp, NAME, items, 5, SRC, "replica_of_rank0") == (
            f"rank 5: the copy of __0_0.distcp received from rank 2 (replica_of_rank0/__0_0.distcp on its node) does "
            f"not match the checkpoint's checksums: w chunk [0, 0] fails its checksum at data bytes "
            f"{start}-{start + 4096}; it was not published and the replica it belongs to (replica_of_rank0) was not "
            f"rebuilt")
        sink.abort()
    assert os.listdir(fast.root) == []  # aborted: nothing left behind
    # a copy cut short (the file holds fewer bytes than the checkpoint's items need)
    short = FastStore(str(tmp_path / "fast"), load_config())
    with open(short.path("short.distcp"), "wb") as out:
        out.write(good[:loc.offset + loc.data_offset + 100])
    msg = verify_received(short, "short.distcp", NAME, items, 5, "the durable copy")
    assert msg.startswith("rank 5: could not verify the copy of __0_0.distcp received from the durable copy: ")
    assert "is truncated" in msg, msg


def test_verify_received_checks_compressed_items(tmp_path):
    """A compressed checkpoint's items are checked frame by frame (decompressed, against the
    uncompressed record's checksums): a damaged frame refuses the copy."""
    from dcp_ext.config import load_config
    import dcp_ext
    import torch.distributed.checkpoint as dcp

    url = str(tmp_path / "ckpt")
    ref = {"w": torch.arange(16 * 1024, dtype=torch.float32).reshape(16, 1024) % 7}  # 64 KiB, compressible
    dcp.save(ref, storage_writer=dcp_ext.storage_writer(url, checksum_block_size="4KiB", compression="zstd"),
             no_dist=True)
    with open(os.path.join(url, ".dcp_ext.json"), "rb") as f:
        m = decode_manifest(f.read(), url)
    items = [(idx, loc) for idx, loc in m.locations.items() if loc.relative_path == "__0_0.distcp"]
    (_idx, loc), = items
    assert loc.compression is not None
    with open(os.path.join(url, "__0_0.distcp"), "rb") as f:
        good = f.read()
    fast = FastStore(str(tmp_path / "fast"), load_config())
    os.makedirs(fast.root)
    for name, data in (("good.distcp", good), ("bad.distcp", None)):
        if data is None:  # a byte in the middle of data block 3's frame
            start, size = loc.compression.block_frame(3)
            bad = bytearray(good)
            bad[loc.offset + start + size // 2] ^= 0x40
            data = bytes(bad)
        with open(fast.path(name), "wb") as out:
            out.write(data)
    assert verify_received(fast, "good.distcp", "__0_0.distcp", items, 1, "rank 0 (__0_0.distcp on its node)") is None
    # (the damaged frame still decompresses here, to the wrong bytes: the block's checksum catches it)
    assert verify_received(fast, "bad.distcp", "__0_0.distcp", items, 1, "rank 0 (__0_0.distcp on its node)") == (
        "rank 1: the copy of __0_0.distcp received from rank 0 (__0_0.distcp on its node) does not match the "
        "checkpoint's checksums: w chunk [0, 0] fails its checksum at data bytes 12288-16384; it was not published")
