"""Every dtype DCP saves, through the reader's ranged and resharded paths, on local disk and on
the S3 and GCS test servers; raw ``bytes`` and ``io.BytesIO`` values; non-contiguous tensors.

Values are random *bytes* viewed as each dtype (every bit pattern: NaNs, infinities, negative
zeros, subnormals), compared bit for bit. Boxes exercise the reader's three ways of placing data:
straight into the destination (one exact span), a packed buffer of spans (verification off) and
block-aligned scratch buffers (verification on).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.utils._pytree import tree_map

import dcp_ext
from tests import dtype_rank_fns as D
from tests.support.stores import Env

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPE = D.SHAPE
#: (rows, columns) boxes: one exact span, strided column spans, a single element, the last row
BOXES = [((5, 20), (0, 53)), ((0, 37), (7, 31)), ((30, 31), (41, 42)), ((36, 37), (0, 53))]


@pytest.fixture(params=["local", "s3", "gcs"])
def where(request) -> Env:
    return Env.of(request, request.param)


def test_every_dcp_dtype_is_covered():
    """The list tested here holds every dtype stock DCP round-trips (a new torch dtype that DCP
    saves must be added, so it is tested too)."""
    import tempfile

    missing = []
    for name in dir(torch):
        dt = getattr(torch, name)
        if not isinstance(dt, torch.dtype) or dt in D.DTYPES.values():
            continue
        try:
            t = torch.zeros(2, 2, dtype=dt)
            with tempfile.TemporaryDirectory() as d:
                dcp.save({"t": t}, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
                dcp.load({"t": torch.empty(2, 2, dtype=dt)}, storage_reader=dcp.FileSystemReader(d), no_dist=True)
        except BaseException:  # noqa: BLE001 - not a dtype DCP handles (quantized, sub-byte ints, bits*)
            continue
        missing.append(str(dt))
    assert not missing, f"dtypes stock DCP saves and loads but these tests do not cover: {missing}"


class BoxesPlanner(DefaultLoadPlanner):
    """Loads each (fqn, rows, cols) box of single-chunk 2-d tensors into its own output tensor."""

    def __init__(self, boxes: list[tuple[str, tuple[int, int], tuple[int, int]]], dtypes: dict[str, torch.dtype]):
        super().__init__()
        self.boxes = boxes
        self.out = {i: torch.zeros(r1 - r0, c1 - c0, dtype=dtypes[f]) for i, (f, (r0, r1), (c0, c1)) in enumerate(boxes)}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (fqn, (r0, r1), (c0, c1)) in enumerate(self.boxes):
            chunk = self.metadata.state_dict_metadata[fqn].chunks[0]
            items.append(ReadItem(LoadItemType.TENSOR, MetadataIndex(f"box{i}", (0, 0)), torch.Size([0, 0]),
                                  MetadataIndex(fqn, chunk.offsets), torch.Size([r0, c0]),
                                  torch.Size([r1 - r0, c1 - c0])))
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        return self.out[int(read_item.dest_index.fqn[3:])]

    def commit_tensor(self, read_item, tensor):
        pass


def _state(seed: int) -> dict:
    state = D.full_state(seed)
    g = torch.Generator().manual_seed(seed + 1)
    state["noncontig"] = {
        "transposed": D.sample(torch.float32, SHAPE[::-1], g).t(),
        "strided": D.sample(torch.bfloat16, (80, 60), g)[::2, 3:56],
        "channels_last": D.sample(torch.float16, (2, 3, 5, 7), g).to(memory_format=torch.channels_last),
        "expanded": D.sample(torch.int32, (1, 53), g).expand(37, 53),
    }
    state["raw_bytes"] = bytes(range(256)) * 3 + b"\x00end"
    state["bytes_io"] = io.BytesIO(b"\xff\x00" * 1000 + b"tail")
    return state


def _empty(state: dict) -> dict:
    """Zeros of the same shapes and dtypes (contiguous), None for every other value."""
    return tree_map(lambda v: torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else None, state)


@pytest.mark.parametrize("verify", [True, False])
def test_every_dtype_ranged_and_whole(where, verify):
    state = _state(3)
    url = where.url()
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, checksum_block_size="4KiB", **where.opts()))
    reader = lambda: dcp_ext.storage_reader(url, verify=verify, **where.opts())  # noqa: E731

    boxes = [(name, rows, cols) for name in D.DTYPES for rows, cols in BOXES]
    boxes += [("noncontig.transposed", (3, 30), (1, 36)), ("noncontig.strided", (2, 40), (10, 11)),
              ("noncontig.expanded", (0, 37), (5, 6))]
    planner = BoxesPlanner(boxes, {**D.DTYPES, "noncontig.transposed": torch.float32,
                                   "noncontig.strided": torch.bfloat16, "noncontig.expanded": torch.int32})
    dcp.load({}, storage_reader=reader(), planner=planner)
    bad = []
    for i, (fqn, (r0, r1), (c0, c1)) in enumerate(boxes):
        src = state["noncontig"][fqn.split(".")[1]] if fqn.startswith("noncontig.") else state[fqn]
        if not D.same_bits(planner.out[i], src[r0:r1, c0:c1]):
            bad.append((fqn, (r0, r1), (c0, c1)))
    assert not bad, f"{where.kind}, verify={verify}: boxes differ: {bad}"

    whole = _empty(state)
    dcp.load(whole, storage_reader=reader())
    bad = [k for k in D.DTYPES if not D.same_bits(whole[k], state[k])]
    bad += [k for k, v in state["noncontig"].items() if not D.same_bits(whole["noncontig"][k], v)]
    assert not bad, f"{where.kind}, verify={verify}: whole tensors differ: {bad}"
    assert whole["raw_bytes"] == state["raw_bytes"] and type(whole["raw_bytes"]) is bytes
    assert isinstance(whole["bytes_io"], io.BytesIO) and whole["bytes_io"].getvalue() == state["bytes_io"].getvalue()


def test_every_dtype_resharded_on_ranks(ranks, where):
    """Row-sharded over 2 ranks (uneven: 19 + 18 rows), loaded column-sharded over 3 (18 + 18 +
    17 columns): every rank reads a strided column box of both saved chunks of every dtype."""
    url = where.url()
    ranks(2).run(D.save_sharded, url, 5, 0, where.opts())
    for rank, res in enumerate(ranks(3).run(D.load_sharded_and_compare, url, 5, 1, where.opts())):
        assert res == {"bad": [], "raw_bytes": True, "bytes_io": True}, (rank, res)
