"""Corruption is caught wherever it lands: one flipped bit in the first, a middle or the last
(partial) checksum block of a multi-block tensor, with either block checksum algorithm (xxh3_64,
crc32c), on local disk and on the S3 and GCS test
servers, for full loads, ranged loads of a box and resharded multi-rank loads.

The block and the bit are drawn from a seeded generator; the seed is in every assertion message
(``DCP_EXT_TEST_SEED=<seed>`` replays a run). The flipped byte is found independently of the
manifest: by searching the data files for the tensor's raw bytes. The checks:

* a read that touches the damaged block fails with ``checksum mismatch`` naming the file, the
  tensor and a byte range (at most one block) holding the flipped byte;
* a ranged read that stays clear of it loads exactly (and reads a fraction of the tensor);
* with ``verify=False`` exactly the one element holding the flipped byte loads changed.
"""

from __future__ import annotations

import math
import os
import random
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcp_ext
from tests import corruption_rank_fns as C
from tests.support.stores import Env

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

BLOCK = 16 * 1024
ROWS, COLS = 300, 1001  # float32: 1,201,200 data bytes = 73 whole 16 KiB blocks + a partial one


@pytest.fixture(params=["local", "s3", "gcs"])
def where(request) -> Env:
    return Env.of(request, request.param)


def seed_for_test() -> int:
    """The run's seed: ``DCP_EXT_TEST_SEED`` or a fresh one (reported in every message)."""
    env = os.environ.get("DCP_EXT_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 31)


def pick_byte(n_data: int, which: str, rng: random.Random, block: int = BLOCK) -> tuple[int, int]:
    """(block, data-relative byte) in the ``which`` block ("first", "middle", "last")."""
    n_blocks = math.ceil(n_data / block)
    assert n_blocks >= 3 and n_data % block, "the tensor must span several blocks and end in a partial one"
    k = {"first": 0, "middle": rng.randrange(1, n_blocks - 1), "last": n_blocks - 1}[which]
    return k, rng.randrange(k * block, min((k + 1) * block, n_data))


def locate(env: Env, url: str, raw: bytes) -> tuple[str, int]:
    """The data file holding ``raw`` (a tensor's bytes) and where they start: found by search,
    not through the manifest."""
    hits = []
    for name in env.names(url):
        if name.endswith(".distcp"):
            data = env.get(url, name)
            at = data.find(raw)
            if at >= 0:
                assert data.find(raw, at + 1) < 0, "the tensor's bytes occur twice"
                hits.append((name, at))
    assert len(hits) == 1, hits
    return hits[0]


def flip_bit(env: Env, url: str, name: str, at: int, rng: random.Random) -> None:
    data = bytearray(env.get(url, name))
    data[at] ^= 1 << rng.randrange(8)
    env.put(url, name, bytes(data))


class BoxPlanner(DefaultLoadPlanner):
    """A ranged load: rows ``[r0, r1)`` of the single-chunk 2-d tensor ``fqn`` into ``out``."""

    def __init__(self, fqn: str, r0: int, r1: int, cols: int):
        super().__init__()
        self.fqn, self.r0, self.r1 = fqn, r0, r1
        self.out = torch.full((r1 - r0, cols), float("nan"))

    def create_local_plan(self) -> LoadPlan:
        chunk = self.metadata.state_dict_metadata[self.fqn].chunks[0]
        return LoadPlan([ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(self.fqn, (0, 0)),
                                  dest_offsets=torch.Size([0, 0]), storage_index=MetadataIndex(self.fqn, chunk.offsets),
                                  storage_offsets=torch.Size([self.r0, 0]),
                                  lengths=torch.Size([self.r1 - self.r0, self.out.shape[1]]))])

    def resolve_tensor(self, read_item):
        return self.out

    def commit_tensor(self, read_item, tensor):
        pass


def error_of(fn) -> str:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - DCP wraps rank errors in a BaseException
        return f"{type(e).__name__}: {e}"
    return "no error"


def assert_flags(msg: str, ctx: str, name: str, flipped_at: int, block: int = BLOCK) -> None:
    """``msg`` reports a checksum mismatch in ``name`` for ``w`` over a range holding the byte."""
    assert "checksum mismatch" in msg and name in msg and " for w " in msg, f"{ctx}: {msg}"
    m = re.search(r"\(bytes (\d+)-(\d+)\)", msg)
    assert m, f"{ctx}: no byte range in {msg}"
    lo, hi = int(m.group(1)), int(m.group(2))
    assert lo <= flipped_at < hi and hi - lo <= block, f"{ctx}: flipped byte {flipped_at} not in {lo}-{hi}: {msg}"


@pytest.mark.parametrize("algo", ["xxh3_64", "crc32c"])
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_flipped_bit_in_a_block_is_caught(where, which, algo):
    """Saved with either block checksum algorithm; loaded with the default configuration (the
    reader follows the algorithm the manifest records)."""
    seed = seed_for_test()
    rng = random.Random(seed)
    w = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))
    state = {"w": w, "other": torch.arange(10.0)}
    url, opts = where.url(), where.opts()
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, checksum_block_size=f"{BLOCK}", files_per_rank=1,
                                                          checksum_algorithm=algo, **opts))
    name, start = locate(where, url, w.numpy().tobytes())
    n_data = w.numel() * w.element_size()
    k, off = pick_byte(n_data, which, rng)
    flip_bit(where, url, name, start + off, rng)
    ctx = (f"seed {seed} ({where.kind}, {algo}, {which} block {k}, data byte {off}; DCP_EXT_TEST_SEED={seed} "
           f"replays it)")
    row_bytes = COLS * w.element_size()
    row = off // row_bytes

    # a full load
    target = {"w": torch.zeros_like(w), "other": torch.zeros(10)}
    msg = error_of(lambda: dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **opts)))
    assert_flags(msg, ctx, name, start + off)

    # a ranged load of a few rows around the damaged one
    r0, r1 = max(0, row - 2), min(ROWS, row + 3)
    msg = error_of(lambda: dcp.load({"w": torch.zeros_like(w)}, storage_reader=dcp_ext.storage_reader(url, **opts),
                                    planner=BoxPlanner("w", r0, r1, COLS)))
    assert_flags(msg, ctx, name, start + off)

    # a ranged load clear of the damaged block (8 rows at the far end) loads exactly
    c0 = 0 if k > (n_data // BLOCK) // 2 else ROWS - 8
    assert c0 * row_bytes // BLOCK > k or ((c0 + 8) * row_bytes - 1) // BLOCK < k, ctx
    clear = BoxPlanner("w", c0, c0 + 8, COLS)
    reader = dcp_ext.storage_reader(url, **opts)
    dcp.load({"w": torch.zeros_like(w)}, storage_reader=reader, planner=clear)
    assert torch.equal(clear.out, w[c0:c0 + 8]), ctx
    assert reader.stats.bytes_read < n_data / 10, (ctx, reader.stats)

    # unverified, exactly the element holding the flipped byte changed
    blind = BoxPlanner("w", r0, r1, COLS)
    dcp.load({"w": torch.zeros_like(w)}, storage_reader=dcp_ext.storage_reader(url, verify=False, **opts),
             planner=blind)
    changed = (blind.out.view(torch.int32) != w[r0:r1].view(torch.int32)).nonzero().tolist()
    assert changed == [[row - r0, (off % row_bytes) // w.element_size()]], (ctx, changed)


@pytest.mark.parametrize("kind", ["local", "s3", "gcs"])
def test_flipped_bit_found_by_a_resharded_load(ranks, request, kind):
    """Saved row-sharded by 2 ranks, loaded row-sharded by 4: the one rank whose new rows cover
    the damaged block reports it (every rank then sees DCP's error), and with verification off
    exactly the flipped element differs."""
    env = Env.of(request, kind)
    seed = seed_for_test()
    rng = random.Random(seed)
    url, opts = env.url(), {**env.opts(), "checksum_block_size": f"{C.BLOCK}"}
    ranks(2).run(C.save_rows, url, seed, opts)
    full = C.full_tensor(seed)
    half = full[C.ROWS // 2:]  # rank 1's saved chunk
    name, start = locate(env, url, half.numpy().tobytes())
    n_data = half.numel() * half.element_size()
    which = rng.choice(["first", "middle", "last"])
    k, off = pick_byte(n_data, which, rng, C.BLOCK)
    flip_bit(env, url, name, start + off, rng)
    ctx = f"seed {seed} ({kind}, {which} block {k} of rank 1's chunk; DCP_EXT_TEST_SEED={seed} replays it)"
    for res in ranks(4).run(C.load_rows, url, seed, opts):
        assert_flags(res["error"], ctx, name, start + off, C.BLOCK)
        assert f"chunk [{C.ROWS // 2}, 0]" in res["error"], (ctx, res)
    res = ranks(4).run(C.load_rows, url, seed, {**opts, "verify": False})
    row_bytes = C.COLS * full.element_size()
    want = [[C.ROWS // 2 + off // row_bytes, (off % row_bytes) // full.element_size()]]
    assert sorted(sum((r["changed"] for r in res), [])) == want, (ctx, res)
