"""The TensorStore (zarr3) backend: layout rules, selection, options, every dtype, integrity,
commit protocol, resharded and DTensor loads on gloo ranks, on local disk, S3 and GCS."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import uuid
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("tensorstore")
import tensorstore as ts  # noqa: E402

import dcp_ext  # noqa: E402
from dcp_ext.errors import (  # noqa: E402
    CheckpointExistsError,
    ConfigError,
    DcpExtError,
    IncompleteCheckpointError,
    MissingDependencyError,
    UnknownBackendError,
)
from dcp_ext.storage.tensorstore import TensorStoreReader, TensorStoreWriter  # noqa: E402
from dcp_ext.storage.tensorstore.layout import (  # noqa: E402
    Grid,
    array_json,
    array_name,
    chunk_count,
    grid_for,
    plan_array,
    stored_dtype,
)
from dcp_ext.verify import inspect_checkpoint, verify_checkpoint  # noqa: E402

from . import object_rank_fns as orf  # noqa: E402
from . import ts_rank_fns as tr  # noqa: E402
from .conftest import get_pool  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TS = {"backend": "tensorstore"}


def _err(fn) -> str:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    raise AssertionError("no error raised")


# -- layout rules (pure) -----------------------------------------------------------------------

def test_array_names_escape_and_stay_distinct():
    assert array_name("model.layers.0.attn.qkv.weight") == "model.layers.0.attn.qkv.weight"
    assert array_name("a/b c%") == "a%2Fb%20c%25"
    assert array_name(".metadata") == "%2Emetadata"
    assert array_name("__objects") == "%5F_objects"
    assert array_name("zarr.json") == "zarr%2Ejson"
    assert array_name("") == "%"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(array_name(long_a)) <= 200 and array_name(long_a) != array_name(long_b)
    names = ["a.b", "a/b", "a%2Fb", "a b", "é", "_x", "__x", "%", ""]
    assert len({array_name(n) for n in names}) == len(names)


def _cells_in_one_box(shape, chunk, boxes) -> bool:
    """Every chunk of the grid lies inside a single box."""
    import itertools

    for idx in itertools.product(*[range(-(-s // c)) for s, c in zip(shape, chunk)]):
        lo = [i * c for i, c in zip(idx, chunk)]
        hi = [min((i + 1) * c, s) for i, c, s in zip(idx, chunk, shape)]
        inside = [b for b in boxes if all(o <= l and h <= o + n for o, n, l, h in zip(b[0], b[1], lo, hi))]
        if len(inside) != 1:
            return False
    return True


@pytest.mark.parametrize("shape,boxes", [
    ([64, 48], [([0, 0], [32, 48]), ([32, 0], [32, 48])]),
    ([64, 48], [([0, 0], [64, 24]), ([0, 24], [64, 24])]),
    ([10, 8], [([0, 0], [3, 8]), ([3, 0], [3, 8]), ([6, 0], [4, 8])]),  # uneven
    ([12, 12], [([0, 0], [6, 4]), ([6, 0], [6, 4]), ([0, 4], [12, 8])]),  # T-junction
    ([96, 16], [([0, 0], [48, 16]), ([48, 0], [24, 16]), ([72, 0], [24, 16])]),  # fused parts
])
def test_chunk_grid_never_spans_two_ranks_boxes(shape, boxes):
    for target in (64, 256, 1 << 20):
        p = plan_array("w", shape, torch.float32, boxes, target, None, "global")
        assert _cells_in_one_box(shape, p.grid.chunk, boxes), (target, p.grid)
        sh = plan_array("w", shape, torch.float32, boxes, target, 4 * target, "global")
        assert _cells_in_one_box(shape, sh.grid.chunk, boxes)
        if sh.grid.inner:  # inner chunks tile a shard exactly
            assert all(c % i == 0 for c, i in zip(sh.grid.chunk, sh.grid.inner))


def test_chunks_split_to_the_target_size_largest_extent_first():
    assert grid_for([4096, 4096], [None, None], 4, 4 << 20, None).chunk == [1024, 1024]
    g = grid_for([4096, 4096], [None, None], 2, 1 << 20, 64 << 20)
    assert g.chunk == [4096, 4096] and g.inner == [512, 1024]  # one 32 MiB shard of 1 MiB chunks
    g = grid_for([1024, 1024], [None, None], 2, 1 << 20, 64 << 20)
    assert g.inner == [256, 256]  # at least 16 chunks: quarters along either dim are whole chunks
    assert grid_for([], [], 4, 1 << 20, 64 << 20).chunk == []
    assert grid_for([0, 5], [None, None], 4, 1 << 20, None).chunk == [1, 5]


WHOLE = [([0, 0], [6144, 2048])]  # a 1-rank save: one box, nothing known from the boxes


@pytest.mark.parametrize("shape,split,expect", [
    ([6144, 2048], {0: None}, [96, 2048]),                 # column-parallel QKV: whole rows
    ([6144, 2048], {0: (4096, 1024, 1024)}, [128, 2048]),  # GQA: each fused part cut 8-way (1024/8)
    ([8192, 2048], {0: None}, [128, 2048]),                # MLP up
    ([2048, 8192], {1: None}, [256, 1024]),                # MLP down (row-parallel): 8 parts, 4 KiB rows
    ([2048, 2048], {1: None}, [512, 512]),                 # proj: 8 parts would be 1 KiB rows: 4 parts
    ([1024, 1024], {1: None}, [1024, 256]),                # 4 parts even with rows under 2 KiB
    ([2048, 2048], {-1 + 2: None}, [512, 512]),
    ([2048, 2048], {}, [128, 2048]),                       # replicated across TP: whole rows
    ([2048, 2048], None, [512, 512]),                      # nothing known: about square, as before
    ([6144, 2048], None, [384, 512]),
])
def test_split_hints_keep_rows_whole_and_cut_the_split_dims(shape, split, expect):
    boxes = [([0] * len(shape), list(shape))]
    assert plan_array("w", shape, torch.float32, boxes, 1 << 20, None, "global", split).grid.chunk == expect


@pytest.mark.parametrize("shape,itemsize,split", [
    ([6144, 2048], 4, {0: None}), ([6144, 2048], 2, {0: (4096, 1024, 1024)}), ([2048, 8192], 4, {1: None}),
    ([2048, 8192], 2, {1: None}), ([2048, 2048], 4, {1: None}), ([50304, 1024], 2, {0: None}),
    ([8, 6144, 2048], 4, {1: None}), ([4096, 4096], 4, {0: None, 1: None}), ([1024], 4, {0: None}),
    ([1 << 20], 4, {0: None}),
])
@pytest.mark.parametrize("shard", [None, 16 << 20, 64 << 20])
def test_split_dims_are_cut_where_every_2_4_8_way_load_cuts_them(shape, itemsize, split, shard):
    """Every read unit lies inside one TP rank's part for 2-, 4- and 8-way splits of each split
    dim (of each fused part on its own), except where the last dim keeps rows of >= 2 KiB; each
    is at most the target size; dims nobody splits stay whole where the target allows."""
    from dcp_ext.storage.tensorstore.layout import MIN_ROW_BYTES

    dtype = {2: torch.bfloat16, 4: torch.float32}[itemsize]
    g = plan_array("w", shape, dtype, [([0] * len(shape), list(shape))], 1 << 20, shard, "global", split).grid
    unit = g.inner or g.chunk
    assert all(c % u == 0 for c, u in zip(g.chunk, unit))
    assert math.prod(unit) * itemsize <= 1 << 20
    if math.prod(unit) == math.prod(shape):
        return  # one chunk holds it all (it fits the target): a load of any part reads it, small
    for d, segments in split.items():
        segs = list(segments or [shape[d]])
        for way in (2, 4, 8):
            if d == len(shape) - 1 and shape[d] // way * itemsize < MIN_ROW_BYTES and way > 4:
                continue  # rows stay long: 4 parts, not 8, along the last dim
            start = 0
            for seg in segs:
                cuts = [start + k * seg // way for k in range(way + 1)] if seg % way == 0 else [start, start + seg]
                assert all(c % unit[d] == 0 for c in cuts), (d, way, cuts, unit)
                start += seg
    last = len(shape) - 1
    if last not in split and shape[last] * itemsize <= 1 << 20:
        assert unit[last] == shape[last]  # whole rows


@pytest.mark.parametrize("shape,boxes,split,shard", [
    ([50026, 4096], None, {0: None}, None),                  # odd rows: the 2-way cut's half is odd
    ([50026, 4096], None, {0: None}, 64 << 20),
    ([2062, 2048], [([0, 0], [1031, 2048]), ([1031, 0], [1031, 2048])], {0: None}, None),  # prime boxes
    ([6144, 2048], None, {0: (4097, 1023, 1024)}, None),     # odd fused segments
])
def test_split_hints_never_make_chunks_far_below_the_target(shape, boxes, split, shard):
    """Where honouring the TP cuts would need tiny chunks (a prime half, odd segments), the cut is
    dropped: never more than 4x the chunks of the layout without hints (found in review: 50,026
    one-row files before)."""
    boxes = boxes or [([0, 0], list(shape))]
    hinted = plan_array("w", shape, torch.float32, boxes, 1 << 20, shard, "global", split).grid
    plain = plan_array("w", shape, torch.float32, boxes, 1 << 20, shard, "global").grid
    assert chunk_count(shape, hinted.inner or hinted.chunk) <= 4 * chunk_count(shape, plain.inner or plain.chunk)
    assert math.prod(hinted.inner or hinted.chunk) * 4 >= 1 << 20 >> 2  # over a quarter of the target


def test_chunk_grids_with_any_hint_keep_every_file_inside_one_box():
    """Random shapes, boxes (even, uneven, random splits), hints (negative dims, fused segments,
    segments that do not add up) and sizes: a file chunk never crosses a saved box's boundary
    (two ranks would write one file), inner chunks tile their shard, every extent is >= 1."""
    import itertools
    import random

    rnd = random.Random(7)
    checked = 0
    for _ in range(600):
        nd = rnd.choice([1, 2, 2, 3])
        shape = [rnd.choice([rnd.randint(1, 40), rnd.randint(1, 3000), 8 * rnd.randint(1, 400)]) for _ in range(nd)]
        per = []
        for size in shape:
            k = rnd.choice([1, 2, 3, 4, 8])
            if rnd.random() < 0.3 and size > 2:
                b = [0] + sorted(rnd.sample(range(1, size), min(k - 1, size - 1))) + [size]
            else:
                b = sorted({size * j // k for j in range(k + 1)})
            per.append([(lo, hi - lo) for lo, hi in zip(b, b[1:])])
        boxes = [([o for o, _ in c], [z for _, z in c]) for c in itertools.product(*per)]
        split = {}
        for d in rnd.sample(range(-nd, nd), rnd.randint(0, min(2, nd))):
            size = shape[d % nd]
            segs = None
            if rnd.random() < 0.4:
                cuts = sorted(rnd.sample(range(1, size), min(rnd.randint(1, 3), size - 1))) if size > 1 else []
                segs = tuple(b - a for a, b in zip([0] + cuts, cuts + [size])) + ((1,) if rnd.random() < 0.2 else ())
            split[d % nd] = segs
        dtype = rnd.choice([torch.float32, torch.bfloat16, torch.int8])
        p = plan_array("w", shape, dtype, boxes, rnd.choice([100, 4096, 16 << 10, 1 << 20]),
                       rnd.choice([None, 64 << 10, 16 << 20]), rnd.choice(["auto", "global"]), split)
        grids = [(s, g) for _n, s, g in p.parts.values()] if p.parts else [(shape, p.grid)]
        for sub, g in grids:
            assert all(c >= 1 for c in g.chunk) and (g.inner is None or all(i >= 1 for i in g.inner))
            if g.inner is not None:
                assert all(c % i == 0 for c, i in zip(g.chunk, g.inner)), (shape, split, g)
        if not p.parts:
            for d, size in enumerate(shape):
                for o, z in boxes:
                    for b in (o[d], o[d] + z[d]):
                        assert not 0 < b < size or b % p.grid.chunk[d] == 0, (shape, boxes, split, p.grid)
        checked += 1
    assert checked == 600


def test_plan_caching_is_refused_clearly_on_the_repeat_save(tmp_path):
    """DCP's plan caching hands a repeat save empty plans for unchanged ranks, from which no
    layout can be built: the repeat save is refused before it touches the location (found in
    review: it used to commit a checkpoint without arrays), and the first one loads exactly."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlanner

    sd = {"w": torch.randn(64, 32), "b": torch.randn(32)}
    first, again = str(tmp_path / "a"), str(tmp_path / "b")
    try:
        dcp.save(sd, storage_writer=dcp_ext.storage_writer(first, **TS), planner=DefaultSavePlanner(enable_plan_caching=True))
        msg = _err(lambda: dcp.save(sd, storage_writer=dcp_ext.storage_writer(again, **TS),
                                    planner=DefaultSavePlanner(enable_plan_caching=True)))
    finally:  # stock keeps its plan caches on the class, keyed by the planner's class name
        for name in ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                     "_cached_metadata"):
            getattr(SavePlanner, name, {}).pop("DefaultSavePlanner", None)
    assert "DCP's plan caching (enable_plan_caching=True) hands a repeat save the plans of unchanged ranks empty" in msg
    assert "ConfigError" in msg and again in msg
    assert not os.path.exists(os.path.join(again, ".metadata"))
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(first, **TS))
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_split_hints_come_from_the_reshard_save_planners_layout():
    from torch.distributed.checkpoint import DefaultSavePlanner

    from dcp_ext.layout import ParallelLayout, ShardSpec
    from dcp_ext.planner import ReshardSavePlanner
    from dcp_ext.save_dedup import split_hints

    state = {"layers.0.qkv.weight": torch.zeros(24, 8), "layers.0.proj.weight": torch.zeros(8, 8),
             "layers.0.norm.weight": torch.zeros(8), "emb": torch.zeros(40, 8), "step": 3}
    rules = {"*.qkv.weight": ShardSpec(0, (16, 4, 4)), "*.proj.weight": ShardSpec(-1), "emb": ShardSpec(0)}
    planner = ReshardSavePlanner(ParallelLayout(rules=rules))
    planner.set_up_planner(state, is_coordinator=True)
    hints = split_hints([planner.create_local_plan()])
    # the norm matches no rule: nothing known (as for DTensors, which carry their own placement)
    assert hints == {"layers.0.qkv.weight": {0: (16, 4, 4)}, "layers.0.proj.weight": {1: None}, "emb": {0: None}}
    stock = DefaultSavePlanner()
    stock.set_up_planner(state, is_coordinator=True)
    assert split_hints([stock.create_local_plan()]) == {}  # nothing known: the grid stays as before


def test_a_reshard_planner_save_lays_out_rows_and_reads_tp_parts_exactly(tmp_path):
    """Saved by one process with the resharding planner's rules, then read as 2-, 4- and 8-way TP
    parts: whole rows where no rule splits, and each part reads only its own bytes (plus the
    4-byte checksum of each chunk and the shard indexes)."""
    from dcp_ext.layout import ParallelLayout, ShardSpec
    from dcp_ext.planner import ReshardSavePlanner
    from dcp_ext.storage.tensorstore.native import ByteCount, ShardIndexes, as_numpy, chunk_format, plan_reads

    g = torch.Generator().manual_seed(3)
    sd = {"qkv": torch.randn(384, 128, generator=g), "down": torch.randn(16, 8192, generator=g),
          "rep": torch.randn(64, 128, generator=g)}
    rules = {"qkv": ShardSpec(0, (256, 64, 64)), "down": ShardSpec(1)}
    url = str(tmp_path / "c")
    opts = {"chunk_size": "16KiB", "shard_size": "128KiB"}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore=opts),
             planner=ReshardSavePlanner(ParallelLayout(rules=rules)))
    md = dcp_ext.storage_reader(url, **TS)
    md.read_metadata()
    fmts = {k: chunk_format(md.array_metadata[k], 4) for k in sd}
    assert fmts["qkv"].unit[-1] == 128  # whole rows
    square = plan_array("rep", [64, 128], torch.float32, [([0, 0], [64, 128])], 16 << 10, 128 << 10, "global").grid
    assert list(fmts["rep"].unit) == (square.inner or square.chunk)  # no rule: as without a layout
    assert fmts["down"].unit[-1] == 1024  # 8 parts of 4 KiB rows
    for name, dim, segs in (("qkv", 0, (256, 64, 64)), ("down", 1, (8192,))):
        w = sd[name]
        for way in (2, 4, 8):
            for r in range(way):
                box = [slice(None), slice(None)]
                parts, start = [], 0
                for seg in segs:  # a Megatron rank's part: its slice of every fused segment
                    parts.append((start + r * seg // way, start + (r + 1) * seg // way))
                    start += seg
                for lo, hi in parts:
                    box[dim] = slice(lo, hi)
                    out = torch.full(w[tuple(box)].shape, -1.0)
                    count = ByteCount()
                    origin = [0, 0]
                    origin[dim] = lo
                    jobs = plan_reads(str(tmp_path / "c" / name), fmts[name], origin, as_numpy(out),
                                      f"loading {name}", url, ShardIndexes(), count)
                    for j in jobs:
                        j.run()
                    assert torch.equal(out, w[tuple(box)])
                    unit = fmts[name].unit
                    chunks = out.numel() // math.prod(unit)
                    index = fmts[name].index_bytes() * math.ceil(w.numel() * 4 / (128 << 10))
                    assert out.numel() % math.prod(unit) == 0, (name, way, unit)  # whole chunks only
                    assert count.n <= out.numel() * 4 + 4 * chunks + index, (name, way, r, count.n)


def test_irregular_boundaries_fall_back_to_one_array_per_box():
    boxes = [([0, 0], [1000, 64]), ([1000, 0], [1001, 64]), ([2001, 0], [999, 64])]  # gcd 1 along dim 0
    p = plan_array("w", [3000, 64], torch.float32, boxes, 1 << 20, None, "auto")
    assert p.per_box and len(p.arrays()) == 3
    assert p.location([1000, 0]) == ("w/part_1000_0", [1000, 0])
    g = plan_array("w", [3000, 64], torch.float32, boxes, 1 << 20, None, "global")
    assert not g.per_box and g.grid.chunk[0] == 1 and chunk_count([3000, 64], g.grid.chunk) == 3000
    even = [([0, 0], [1500, 64]), ([1500, 0], [1500, 64])]
    assert not plan_array("w", [3000, 64], torch.float32, even, 1 << 20, None, "auto").per_box


def test_dtypes_zarr_lacks_are_bitcast():
    assert stored_dtype(torch.bfloat16).zarr == "bfloat16" and not stored_dtype(torch.bfloat16).bitcast
    assert stored_dtype(torch.bool).zarr == "bool"
    assert stored_dtype(torch.complex32).zarr == "uint32" and stored_dtype(torch.complex32).bitcast
    with pytest.raises(TypeError, match="quantized"):
        stored_dtype(torch.qint8)


# -- selection and options ---------------------------------------------------------------------

def test_selected_by_scheme_backend_option_env_and_config_file(tmp_path, monkeypatch):
    p = str(tmp_path / "c")
    assert isinstance(dcp_ext.storage_writer(f"zarr3+file://{p}"), TensorStoreWriter)
    assert isinstance(dcp_ext.storage_reader(p, backend="tensorstore"), TensorStoreReader)
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text('backend = "tensorstore"\n[tensorstore]\nchunk_size = "64KiB"\ncompression = "zstd"\n')
    w = dcp_ext.storage_writer(p, config=str(cfg))
    assert isinstance(w, TensorStoreWriter) and w.config.tensorstore.chunk_size == 64 * 1024
    monkeypatch.setenv("DCP_EXT_BACKEND", "tensorstore")
    monkeypatch.setenv("DCP_EXT_TENSORSTORE_COMPRESSION_LEVEL", "7")
    w = dcp_ext.storage_writer(p)
    assert isinstance(w, TensorStoreWriter) and w.config.tensorstore.compression_level == 7


@pytest.mark.parametrize("opts,msg", [
    ({"chunk_size": 100}, "tensorstore.chunk_size: must be >= 1KiB"),
    ({"shard_size": "64KiB", "chunk_size": "1MiB"}, "tensorstore.shard_size: must be >= tensorstore.chunk_size"),
    ({"compression": "lz4"}, "tensorstore.compression: must be 'zstd' or None, got 'lz4'"),
    ({"compression_level": 23}, "tensorstore.compression_level: must be in -131072..22"),
    ({"concurrency": 0}, "tensorstore.concurrency: must be >= 1"),
    ({"inflight_bytes": 10}, "tensorstore.inflight_bytes: must be >= 1MiB"),
    ({"layout": "rows"}, "tensorstore.layout: must be 'auto', 'global' or 'per_box'"),
    ({"native_file_io": "sometimes"}, "tensorstore.native_file_io: expected true/false, got 'sometimes'"),
    ({"native_file_io": 1}, "tensorstore.native_file_io: expected true/false, got 1"),
    ({"chunks": 3}, "unknown option 'tensorstore.chunks'; valid options in [tensorstore]: chunk_size"),
    ({"chunk_size": "big"}, "tensorstore.chunk_size: expected a byte size"),
])
def test_bad_options_are_named(tmp_path, opts, msg):
    with pytest.raises(ConfigError) as ei:
        dcp_ext.storage_writer(str(tmp_path), backend="tensorstore", tensorstore=opts)
    assert msg in str(ei.value)


def test_native_file_io_from_config_file_and_environment(tmp_path, monkeypatch):
    p = str(tmp_path / "c")
    assert dcp_ext.storage_writer(p, **TS).config.tensorstore.native_file_io is True  # the default
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text('backend = "tensorstore"\n[tensorstore]\nnative_file_io = false\n')
    assert dcp_ext.storage_reader(p, config=str(cfg)).config.tensorstore.native_file_io is False
    monkeypatch.setenv("DCP_EXT_TENSORSTORE_NATIVE_FILE_IO", "off")
    assert dcp_ext.storage_writer(p, **TS).config.tensorstore.native_file_io is False
    monkeypatch.setenv("DCP_EXT_TENSORSTORE_NATIVE_FILE_IO", "maybe")
    e = _err(lambda: dcp_ext.storage_writer(p, **TS))
    assert "ConfigError" in e and "tensorstore.native_file_io: expected true/false, got 'maybe'" in e, e


def test_bad_urls_and_kvstore_extras_are_named(tmp_path):
    assert "no backend for URL scheme 'zarr3+ftp'" in _err(lambda: dcp_ext.storage_writer("zarr3+ftp://h/x"))
    e = _err(lambda: dcp_ext.storage_writer("ftp://h/x", backend="tensorstore"))
    assert "UnknownBackendError" in e and "zarr3+file://, zarr3+s3://" in e
    assert "names no bucket" in _err(lambda: dcp_ext.storage_writer("zarr3+s3:///p"))
    e = _err(lambda: dcp_ext.storage_writer(str(tmp_path), backend="tensorstore",
                                            tensorstore={"kvstore": {"driver": "memory"}}))
    assert "tensorstore.kvstore: 'driver', 'bucket' and 'path' come from the URL" in e
    e = _err(lambda: dcp_ext.storage_writer("zarr3+gs://b/p", gcs={"token": "anon", "endpoint_url": None}))
    assert "needs an emulator endpoint" in e or "TENSORSTORE_GCS_HTTP_URL" in e


def test_missing_tensorstore_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # import tensorstore -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'dcp-ext\[tensorstore\]'"):
        dcp_ext.storage_writer(f"zarr3+file://{tmp_path}")
    with pytest.raises(UnknownBackendError):
        dcp_ext.storage_writer(str(tmp_path), backend="zarr")


# -- one process: dtypes, plain tensorstore interop, integrity, commit -------------------------

def _all_dtypes_state() -> dict:
    g = torch.Generator().manual_seed(5)
    r = torch.randn(40, 24, generator=g)
    return {
        "w": r, "w_bf16": r.to(torch.bfloat16), "half": r[:5].half(), "f64": r[:3].double(),
        "flag": r[0] > 0, "i8": (r[1] * 50).to(torch.int8), "u8": (r[2].abs() * 50).to(torch.uint8),
        "i64": torch.arange(-5, 5), "i32": torch.arange(7, dtype=torch.int32), "i16": torch.arange(3, dtype=torch.int16),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16), "c64": torch.randn(4, dtype=torch.complex64, generator=g),
        "c128": torch.randn(4, dtype=torch.complex128, generator=g), "c32": r[3, :6].view(torch.complex32),
        "f8": r[4].to(torch.float8_e4m3fn), "f8b": r[5].to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5), "empty": torch.empty(0, 7), "odd/name %": torch.ones(3),
        "obj": {"step": 3, "note": "a/b"}, "blob": b"\x00\x01raw",
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.complex32, torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _zero_like(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v.view(torch.uint8) if v.dtype == torch.complex32 else v)
            out[k] = out[k].view(torch.complex32) if v.dtype == torch.complex32 else out[k]
        elif isinstance(v, dict):
            out[k] = {kk: None for kk in v}
        else:
            out[k] = None
    return out


def test_every_dtype_roundtrips_and_plain_tensorstore_opens_the_arrays(tmp_path):
    url = f"zarr3+file://{tmp_path}/ck"
    sd = _all_dtypes_state()
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url))
    out = _zero_like(sd)
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert _same(out[k], v), k
    assert out["obj"] == {"step": 3, "note": "a/b"} and out["blob"] == b"\x00\x01raw"
    # a plain TensorStore open by path: shape, dtype and values exactly
    w = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/ck/w/"}).result()
    assert w.dtype == ts.float32 and list(w.shape) == [40, 24]
    assert torch.equal(torch.from_numpy(w.read().result()), sd["w"])
    b = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/ck/w_bf16/"}).result()
    assert b.dtype == ts.bfloat16
    assert torch.equal(torch.from_numpy(b.read().result().view("int16")).view(torch.bfloat16), sd["w_bf16"])
    name = array_name("odd/name %")  # "odd%2Fname%20%25": a directory of that name; in a URL, quote it again
    odd = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{tmp_path}/ck/{name}/"}}).result()
    assert odd.read().result().tolist() == [1.0, 1.0, 1.0]
    from urllib.parse import quote

    odd = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/ck/{quote(name)}/"}).result()
    assert odd.read().result().tolist() == [1.0, 1.0, 1.0]
    c32 = json.loads((tmp_path / "ck" / "c32" / "zarr.json").read_text())
    assert c32["data_type"] == "uint32" and c32["attributes"]["dcp_ext"]["bitcast_from"] == "complex32"
    assert json.loads((tmp_path / "ck" / "zarr.json").read_text())["node_type"] == "group"


def test_every_chunk_has_crc32c_and_zstd_when_asked(tmp_path):
    url = str(tmp_path / "z")
    sd = {"w": torch.zeros(512, 512), "v": torch.arange(4096.0)}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore={"compression": "zstd",
                                                                                "compression_level": 5}))
    md = json.loads((tmp_path / "z" / "w" / "zarr.json").read_text())
    inner = md["codecs"][0]["configuration"]["codecs"] if md["codecs"][0]["name"] == "sharding_indexed" else md["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "zstd", "crc32c"] and inner[1]["configuration"]["level"] == 5
    size = sum(f.stat().st_size for f in (tmp_path / "z" / "w").rglob("*") if f.is_file())
    assert size < 512 * 512 * 4 / 20  # zeros compress
    out = {"w": torch.ones(512, 512), "v": torch.zeros(4096)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **TS))
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["v"], sd["v"])


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _chunk_files(d):
    return sorted(f for f in d.rglob("*") if f.is_file() and f.name != "zarr.json")


@pytest.mark.parametrize("shards", [None, "256KiB"])
def test_a_flipped_bit_fails_the_load_naming_the_tensor(tmp_path, shards):
    url = str(tmp_path / "c")
    sd = {"layer.w": torch.randn(256, 256), "other": torch.randn(8)}
    opts = {**TS, "tensorstore": {"chunk_size": "64KiB", "shard_size": shards}}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **opts))
    files = _chunk_files(tmp_path / "c" / "layer.w")
    assert len(files) == (1 if shards else 4)  # one 256 KiB shard of 64 KiB chunks, or four 64 KiB chunks
    _flip_a_byte(files[-1])
    out = {"layer.w": torch.zeros(256, 256), "other": torch.zeros(8)}
    e = _err(lambda: dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **opts)))
    assert "CorruptCheckpointError" in e and "layer.w" in e and "crc32c" in e
    rep = verify_checkpoint(url, **opts)
    assert not rep.ok and len(rep.errors) == 1 and "layer.w" in rep.errors[0]
    r = subprocess.run([sys.executable, "-m", "dcp_ext.cli", "verify", f"zarr3+file://{tmp_path}/c"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 1 and "CORRUPT" in r.stdout and "layer.w" in r.stderr


def test_a_missing_chunk_or_object_is_corruption_not_zeros(tmp_path):
    url = str(tmp_path / "c")
    dcp.save({"w": torch.randn(64, 64), "obj": {"k": 1}}, storage_writer=dcp_ext.storage_writer(
        url, **TS, tensorstore={"chunk_size": "4KiB", "shard_size": None}))
    _chunk_files(tmp_path / "c" / "w")[0].unlink()
    e = _err(lambda: dcp.load({"w": torch.zeros(64, 64), "obj": {"k": None}},
                              storage_reader=dcp_ext.storage_reader(url, **TS)))
    assert "CorruptCheckpointError" in e and "chunk is missing" in e and "w" in e
    (tmp_path / "c" / "__objects" / "obj.k").unlink()
    assert any("obj.k" in x and "missing" in x for x in verify_checkpoint(url, **TS).errors)


def test_commit_protocol_overwrite_and_incomplete(tmp_path):
    url = str(tmp_path / "c")
    dcp.save({"a": torch.ones(4), "gone": torch.ones(2)}, storage_writer=dcp_ext.storage_writer(url, **TS))
    e = _err(lambda: dcp.save({"a": torch.zeros(4)}, storage_writer=dcp_ext.storage_writer(url, **TS)))
    assert "Checkpoint already exists" in e
    with pytest.raises(CheckpointExistsError):
        dcp_ext.storage_writer(url, **TS).prepare_local_plan(None)
    dcp.save({"a": torch.full((4,), 2.0)}, storage_writer=dcp_ext.storage_writer(url, **TS, overwrite=True))
    assert not (tmp_path / "c" / "gone").exists()  # the old checkpoint's arrays are gone
    out = {"a": torch.zeros(4)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **TS))
    assert torch.equal(out["a"], torch.full((4,), 2.0))
    (tmp_path / "c" / ".metadata").unlink()
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        dcp_ext.storage_reader(url, **TS).read_metadata()


def test_async_save_then_load(tmp_path):
    url = f"zarr3+file://{tmp_path}/a"
    sd = {"w": torch.randn(128, 64), "b": torch.randn(64).to(torch.bfloat16), "step": 5}
    dcp.async_save(sd, storage_writer=dcp_ext.storage_writer(url)).result()
    out = {"w": torch.zeros(128, 64), "b": torch.zeros(64, dtype=torch.bfloat16), "step": -1}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"]) and out["step"] == 5


# -- native chunk I/O on local files (native.py) ------------------------------------------------

NATIVE_OFF = {"native_file_io": False}


def _native_state() -> dict:
    g = torch.Generator().manual_seed(9)
    r = torch.randn(37, 29, generator=g)  # no extent divides evenly: edge chunks pad past the end
    return {"w": r, "b": r.to(torch.bfloat16), "flag": r > 0, "c128": torch.randn(5, 7, dtype=torch.complex128,
                                                                                    generator=g),
            "c32": r[:6, :8].contiguous().view(torch.complex32), "f8": r[:9].to(torch.float8_e4m3fn),
            "scalar": torch.tensor(-1.5), "empty": torch.empty(0, 3), "long": torch.arange(3000),
            "cube": torch.randn(5, 9, 13, generator=g).to(torch.bfloat16), "step": 4}


def _files(root) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*")
            if f.is_file() and "c" in f.relative_to(root).parts[1:2]}


@pytest.mark.parametrize("grid", [{"chunk_size": "1KiB", "shard_size": None},
                                  {"chunk_size": "1KiB", "shard_size": "4KiB"}])
def test_native_chunks_are_what_tensorstore_writes_and_reads(tmp_path, grid):
    sd = _native_state()
    tensors = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    wn = dcp_ext.storage_writer(str(tmp_path / "n"), **TS, tensorstore=grid)
    wt = dcp_ext.storage_writer(str(tmp_path / "t"), **TS, tensorstore={**grid, **NATIVE_OFF})
    dcp.save(sd, storage_writer=wn)
    dcp.save(sd, storage_writer=wt)
    assert wn.stats.native == len(tensors) and wt.stats.native == 0
    assert wn.stats.bytes_written > sum(v.numel() * v.element_size() for k, v in sd.items() if k in tensors)
    native, by_ts = _files(tmp_path / "n"), _files(tmp_path / "t")
    assert native.keys() == by_ts.keys() and len(native) > len(tensors)
    # a chunk is fully determined (its elements, padded, + crc32c); a shard too when written whole:
    # inner chunks in C order, then the index
    assert native == by_ts
    # the native writer writes each array's zarr.json itself: the same bytes TensorStore writes
    jn = {str(f.relative_to(tmp_path / "n")): f.read_bytes() for f in (tmp_path / "n").rglob("*/zarr.json")}
    jt = {str(f.relative_to(tmp_path / "t")): f.read_bytes() for f in (tmp_path / "t").rglob("*/zarr.json")}
    assert len(jn) == len(tensors) and jn == jt
    # each reads what the other wrote, exactly
    nonempty = len([k for k in tensors if sd[k].numel()])  # DCP asks for no read of an empty tensor
    for src, opts, n_native in (("n", {**grid, **NATIVE_OFF}, 0), ("t", grid, nonempty)):
        out = _zero_like(sd)
        r = dcp_ext.storage_reader(str(tmp_path / src), **TS, tensorstore=opts)
        dcp.load(out, storage_reader=r)
        assert all(_same(out[k], sd[k]) for k in tensors) and out["step"] == 4, src
        assert r.stats.native == n_native and r.stats.bytes_read >= r.stats.bytes_needed
    w = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{tmp_path}/n/w/"}}).result()
    assert torch.equal(torch.from_numpy(w.read().result()), sd["w"])
    f = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{tmp_path}/n/flag/"}}).result()
    assert torch.equal(torch.from_numpy(f.read().result()), sd["flag"])


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float64,
                                   torch.complex64, torch.float8_e4m3fn, torch.complex32, torch.uint32])
@pytest.mark.parametrize("grid,cfg", [(Grid([6, 8]), {}), (Grid([12, 8], [3, 4]), {}),
                                      (Grid([6, 8]), {"tensorstore": {"compression": "zstd"}})])
def test_array_json_is_what_tensorstore_writes(tmp_path, dtype, grid, cfg):
    """``layout.array_json``: byte for byte TensorStore's ``zarr.json`` of the same metadata, for
    every kind of fill value (bool, ints, floats, complex), bit-cast dtypes, shards, zstd and a
    non-ASCII FQN."""
    from dcp_ext.config import load_config
    from dcp_ext.storage.tensorstore.arrays import array_metadata

    md = array_metadata([12, 8], dtype, grid, load_config(cfg), "layers.0.wörter/ß")
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{tmp_path}/a/"}, "metadata": md},
            create=True).result()
    assert array_json(md) == (tmp_path / "a" / "zarr.json").read_bytes()


def test_a_zarr_json_that_cannot_be_written_fails_the_save_naming_the_array(tmp_path, monkeypatch):
    real = os.open

    def full_disk(path, *a, **k):
        if str(path).endswith(os.path.join("w", "zarr.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", full_disk)
    msg = _err(lambda: dcp.save({"w": torch.randn(8, 8), "b": torch.ones(3)},
                                storage_writer=dcp_ext.storage_writer(str(tmp_path / "c"), **TS)))
    assert re.search(r"StorageError.*creating array w: cannot write .*w/zarr\.json: No space left on device", msg,
                     re.S), msg
    monkeypatch.undo()
    assert not (tmp_path / "c" / ".metadata").exists()
    with pytest.raises(BaseException, match="incomplete"):  # refused as incomplete, not read as zeros
        dcp.load({"w": torch.zeros(8, 8)}, storage_reader=dcp_ext.storage_reader(str(tmp_path / "c"), **TS))


@pytest.mark.parametrize("native", [True, False])
def test_conjugate_and_negative_views_save_and_load_their_values(tmp_path, native):
    c = torch.randn(6, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    r = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    sd = {"conj": c.conj(), "neg": torch._neg_view(r)}
    expect = {"conj": c.conj().resolve_conj(), "neg": -r}
    opts = {**TS, "tensorstore": {"native_file_io": native, "chunk_size": "1KiB"}}
    url = str(tmp_path / "c")
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **opts))
    out = {"conj": torch.zeros(6, 4, dtype=torch.complex64).conj(), "neg": torch._neg_view(torch.zeros(5, 3))}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **opts))
    assert torch.equal(out["conj"].resolve_conj(), expect["conj"])
    assert torch.equal(out["neg"].resolve_neg(), expect["neg"])


def test_native_io_gathers_strided_sources_and_scatters_into_strided_targets(tmp_path):
    x = torch.randn(48, 40)
    sd = {"t": x.t(), "every_other": x[:, ::2], "bf": x.to(torch.bfloat16).t()}
    url = str(tmp_path / "c")
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore={"chunk_size": "1KiB"}))
    out = {"t": torch.zeros(48, 40).t(), "every_other": torch.zeros(48, 40)[:, ::2],
           "bf": torch.zeros(40, 48, dtype=torch.bfloat16)}
    r = dcp_ext.storage_reader(url, **TS)
    dcp.load(out, storage_reader=r)
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    assert r.stats.native == 3 and r.stats.direct == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64, torch.complex128])
def test_copy_rows_copies_tiles_of_every_shape_exactly(dtype):
    from dcp_ext.storage.tensorstore.native import as_numpy, copy_rows

    g = torch.Generator().manual_seed(5)
    big = (torch.randn(6, 10, 12, generator=g) * 100).to(dtype)
    cases = [(slice(1, 4), slice(2, 9), slice(3, 10)),   # an inner tile: rows of 7 elements
             (slice(None), slice(8, 10), slice(11, 12)),  # rows of one element (plain copy)
             (slice(5, 6), slice(0, 10), slice(0, 12)),   # whole rows
             (slice(2, 4), slice(3, 3), slice(None)),     # empty
             (slice(None), slice(None), slice(None, None, 2)),  # last dim strided (plain copy)
             (3, 4, slice(1, 11)),                        # 1-D
             (3, 4, 5)]                                   # 0-dim
    for box in cases:
        src = big[box].clone()  # contiguous, like a chunk's scratch
        dst = torch.zeros(6, 10, 12, dtype=dtype)
        copy_rows(as_numpy(dst)[(*box, ...)], as_numpy(src))  # `...`: a view even when 0-dim
        expect = torch.zeros(6, 10, 12, dtype=dtype)
        expect[box] = src
        assert torch.equal(dst, expect), box
        gathered = torch.zeros_like(src)  # the other way: a strided source into a contiguous buffer
        copy_rows(as_numpy(gathered), as_numpy(big)[(*box, ...)])
        assert torch.equal(gathered, big[box]), box


def test_native_partial_reads_fetch_only_the_chunks_needed(tmp_path):
    from dcp_ext.storage.tensorstore.native import ByteCount, ShardIndexes, as_numpy, chunk_format, plan_reads

    w = torch.randn(256, 512)
    url = str(tmp_path / "c")
    dcp.save({"w": w}, storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore={"chunk_size": "16KiB",
                                                                                       "shard_size": "256KiB"}))
    md = dcp_ext.storage_reader(url, **TS)
    md.read_metadata()
    fmt = chunk_format(md.array_metadata["w"], 4)
    assert fmt is not None and fmt.inner is not None
    for rows, cols in ((slice(64, 128), slice(0, 512)), (slice(0, 256), slice(128, 256)), (slice(3, 5), slice(7, 9))):
        out = torch.full((rows.stop - rows.start, cols.stop - cols.start), -1.0)
        count = ByteCount()
        jobs = plan_reads(str(tmp_path / "c" / "w"), fmt, [rows.start, cols.start], as_numpy(out), "loading w", url,
                          ShardIndexes(), count)
        for j in jobs:
            j.run()
        assert torch.equal(out, w[rows, cols])
        index = fmt.index_bytes() * (256 * 512 * 4 // (256 * 1024))  # one index per touched shard at most
        chunk = math.prod(fmt.inner) * 4 + 4
        assert count.n <= max(1.1 * out.numel() * 4, chunk) + index, (rows, cols, count.n)


def test_native_writes_leave_unaligned_boxes_to_tensorstore():
    from dcp_ext.storage.tensorstore.native import ByteCount, ChunkFormat, as_numpy, plan_writes

    fmt = ChunkFormat(shape=(10, 8), chunk=(4, 8), inner=None, itemsize=4)
    src = as_numpy(torch.zeros(3, 8))
    assert plan_writes("/nonexistent", fmt, [3, 0], src, False, set(), ByteCount()) is None  # starts mid-chunk
    assert plan_writes("/nonexistent", fmt, [4, 0], src, False, set(), ByteCount()) is None  # ends mid-chunk
    assert plan_writes("/nonexistent", fmt, [0, 0], as_numpy(torch.zeros(0, 8)), False, set(), ByteCount()) == []


def _shard_index(path, n_inner):
    data = bytearray(path.read_bytes())
    start = len(data) - 16 * n_inner - 4
    return data, start


def _rewrite_index(path, mutate, n_inner):
    import crc32c

    data, start = _shard_index(path, n_inner)
    idx = bytearray(data[start:-4])
    mutate(idx)
    data[start:-4] = idx
    data[-4:] = crc32c.crc32c(bytes(idx)).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,msg", [
    ("data_bit", "a chunk fails its crc32c checksum"),
    ("crc_bit", "a chunk fails its crc32c checksum"),
    ("truncate", "a chunk has the wrong size"),
    ("append", "a chunk has the wrong size"),
    ("delete", "a chunk is missing"),
    ("shard_data_bit", "a chunk fails its crc32c checksum"),
    ("index_bit", "a chunk fails its crc32c checksum"),
    ("index_missing", "a chunk is missing"),
    ("index_size", "a chunk has the wrong size"),
    ("index_past_end", "a chunk has the wrong size"),
    ("shard_truncated", "a chunk has the wrong size"),
])
@pytest.mark.parametrize("route", ["scratch", "direct"])
def test_native_reads_refuse_damaged_chunks_and_shard_indexes(tmp_path, damage, msg, route):
    """Each way a chunk is read: into scratch, then copied (16x16 chunks of 32 columns: not a
    contiguous run of the tensor), or straight into the tensor (16x16 chunks of 16 columns)."""
    sharded = damage.startswith(("index", "shard"))
    opts = {**TS, "tensorstore": {"chunk_size": "1KiB", "shard_size": "8KiB" if sharded else None}}
    url = str(tmp_path / "c")
    shape = (64, 16) if route == "direct" else (64, 32)
    dcp.save({"layer.w": torch.randn(*shape)}, storage_writer=dcp_ext.storage_writer(url, **opts))
    f = _chunk_files(tmp_path / "c" / "layer.w")[0]
    md = json.loads((tmp_path / "c" / "layer.w" / "zarr.json").read_text())
    n_inner = math.prod(shape) * 4 // 1024  # one shard of 1 KiB inner chunks
    assert md["chunk_grid"]["configuration"]["chunk_shape"] == (list(shape) if sharded else [16, 16])
    if damage in ("data_bit", "shard_data_bit"):
        data = bytearray(f.read_bytes())
        data[5] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "crc_bit":
        data = bytearray(f.read_bytes())
        data[-2] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    elif damage == "append":
        f.write_bytes(f.read_bytes() + b"\0")
    elif damage == "delete":
        f.unlink()
    elif damage == "index_bit":
        data, start = _shard_index(f, n_inner)
        data[start + 3] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "index_missing":
        _rewrite_index(f, lambda idx: idx.__setitem__(slice(16, 32), b"\xff" * 16), n_inner)
    elif damage == "index_size":
        _rewrite_index(f, lambda idx: idx.__setitem__(slice(8, 16), (7).to_bytes(8, "little")), n_inner)
    elif damage == "index_past_end":  # the last chunk said to lie past the data: never read past the file
        _rewrite_index(f, lambda idx: idx.__setitem__(slice(-16, -8), (10**6).to_bytes(8, "little")), n_inner)
    else:
        f.write_bytes(f.read_bytes()[-100:])
    e = _err(lambda: dcp.load({"layer.w": torch.zeros(*shape)}, storage_reader=dcp_ext.storage_reader(url, **opts)))
    assert "CorruptCheckpointError" in e and "loading layer.w" in e and msg in e, e


def test_a_failed_native_write_fails_the_save_clearly_and_commits_nothing(tmp_path, monkeypatch):
    from dcp_ext.storage.tensorstore import native

    def no_space(fd, bufs, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("DCP_EXT_TENSORSTORE_NATIVE_ROWIO", "0")  # the NumPy path these patch os for (the C row path: test_tensorstore_rowio.py)
    monkeypatch.setattr(native.os, "pwritev", no_space)
    url = str(tmp_path / "c")
    e = _err(lambda: dcp.save({"layer.w": torch.randn(64, 32)},
                              storage_writer=dcp_ext.storage_writer(url, **TS, tensorstore={"chunk_size": "1KiB"})))
    assert "StorageError" in e and "saving layer.w: writing " in e and "failed: No space left on device" in e, e
    assert not (tmp_path / "c" / ".metadata").exists()
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        dcp_ext.storage_reader(url, **TS).read_metadata()


def test_a_failed_native_read_fails_the_load_naming_the_tensor(tmp_path, monkeypatch):
    from dcp_ext.storage.tensorstore import native

    url = str(tmp_path / "c")
    dcp.save({"layer.w": torch.randn(64, 32)}, storage_writer=dcp_ext.storage_writer(url, **TS))

    real = os.preadv

    def io_error(fd, bufs, offset):  # on chunk files only (native.os is the os module)
        if "/layer.w/c/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, offset)

    monkeypatch.setenv("DCP_EXT_TENSORSTORE_NATIVE_ROWIO", "0")  # the NumPy path these patch os for (the C row path: test_tensorstore_rowio.py)
    monkeypatch.setattr(native.os, "preadv", io_error)
    e = _err(lambda: dcp.load({"layer.w": torch.zeros(64, 32)}, storage_reader=dcp_ext.storage_reader(url, **TS)))
    assert "StorageError" in e and "loading layer.w: reading " in e and "failed: Input/output error" in e, e


def test_native_io_resumes_short_writes_and_reads(tmp_path, monkeypatch):
    from dcp_ext.storage.tensorstore import native

    real_w, real_r = os.pwritev, os.preadv
    calls = {"w": 0, "r": 0}

    def chunk_file(fd):
        return "/w/c/" in os.readlink(f"/proc/self/fd/{fd}")

    def short(real, kind, limit):
        def op(fd, bufs, offset):  # at most ``limit`` bytes per call, ending mid-buffer
            if not chunk_file(fd):
                return real(fd, bufs, offset)
            calls[kind] += 1
            out, left = [], limit
            for b in bufs:
                if left == 0:
                    break
                out.append(memoryview(b)[:left])
                left -= len(out[-1])
            return real(fd, out, offset)
        return op

    monkeypatch.setenv("DCP_EXT_TENSORSTORE_NATIVE_ROWIO", "0")  # the NumPy path these patch os for (the C row path: test_tensorstore_rowio.py)
    monkeypatch.setattr(native.os, "pwritev", short(real_w, "w", 1000))
    monkeypatch.setattr(native.os, "preadv", short(real_r, "r", 700))
    w = torch.randn(96, 16)  # 16x16 chunks (whole rows: read straight into the tensor by preadv)
    url = str(tmp_path / "c")
    opts = {**TS, "tensorstore": {"chunk_size": "1KiB", "shard_size": "4KiB"}}
    dcp.save({"w": w}, storage_writer=dcp_ext.storage_writer(url, **opts))
    out = {"w": torch.zeros(96, 16)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **opts))
    assert torch.equal(out["w"], w)
    stored = sum(f.stat().st_size for f in _chunk_files(tmp_path / "c" / "w"))
    assert calls["w"] >= stored // 1000 and calls["r"] >= (96 * 16 * 4) // 700, calls


def test_native_writes_fsync_each_chunk_file_unless_fs_fsync_is_off(tmp_path, monkeypatch):
    from dcp_ext.storage.tensorstore import native

    calls = []
    real = native.os.fsync
    monkeypatch.setattr(native.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    sd = {"w": torch.randn(64, 64)}
    opts = {"chunk_size": "4KiB", "shard_size": None}
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(str(tmp_path / "a"), **TS, tensorstore=opts))
    assert len(calls) >= len(_chunk_files(tmp_path / "a" / "w")) == 4
    calls.clear()
    dcp.save(sd, storage_writer=dcp_ext.storage_writer(str(tmp_path / "b"), **TS, tensorstore=opts,
                                                       fs={"fsync": False}))
    assert calls == []
    out = {"w": torch.zeros(64, 64)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path / "b"), **TS))
    assert torch.equal(out["w"], sd["w"])


def test_each_reader_refuses_the_other_format(tmp_path):
    dcp.save({"a": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(str(tmp_path / "z"), **TS))
    dcp.save({"a": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(str(tmp_path / "f")))
    with pytest.raises(DcpExtError, match="is not a TensorStore"):
        dcp_ext.storage_reader(str(tmp_path / "f"), **TS).read_metadata()
    with pytest.raises(DcpExtError, match="backend='tensorstore'"):
        dcp_ext.storage_reader(str(tmp_path / "z")).read_metadata()


def test_inspect_cli_describes_the_arrays(tmp_path):
    dcp.save({"w": torch.randn(8, 4).to(torch.bfloat16), "n": 3},
             storage_writer=dcp_ext.storage_writer(str(tmp_path / "c"), **TS))
    info = inspect_checkpoint(f"zarr3+file://{tmp_path}/c")
    assert info["layout"] == "zarr3" and info["tensors"]["w"] == {"dtype": "bfloat16", "size": [8, 4], "chunks": 1,
                                                                  "array": "w"}
    assert info["objects"] == ["n"] and info["world_size"] == 1
    assert inspect_checkpoint(str(tmp_path / "c"))["layout"] == "zarr3"  # a plain path finds the backend
    r = subprocess.run([sys.executable, "-m", "dcp_ext.cli", "inspect", str(tmp_path / "c")], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and "bfloat16" in r.stdout and "(object)" in r.stdout


def test_a_killed_save_is_refused_and_an_earlier_checkpoint_stays_intact(tmp_path):
    first, second = str(tmp_path / "step_1"), str(tmp_path / "step_2")
    dcp.save(tr.big_state(1), storage_writer=dcp_ext.storage_writer(first, **TS))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "tests.ts_rank_fns", "killed_saver", second], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "WRITING", p.stderr.read()
        p.kill()  # SIGKILL mid-save: no cleanup
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    assert list((tmp_path / "step_2").glob("layer*"))  # it had started writing arrays
    with pytest.raises(IncompleteCheckpointError):
        dcp_ext.storage_reader(second, **TS).read_metadata()
    out = {k: torch.zeros_like(v) for k, v in tr.big_state(1).items()}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(first, **TS))
    assert all(torch.equal(out[k], v) for k, v in tr.big_state(1).items())
    # the dead save's location takes a new save without overwrite=True (it was never committed)
    dcp.save(tr.big_state(3), storage_writer=dcp_ext.storage_writer(second, **TS))
    out = {k: torch.zeros_like(v) for k, v in tr.big_state(3).items()}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(second, **TS))
    assert all(torch.equal(out[k], v) for k, v in tr.big_state(3).items())


# -- gloo ranks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("world,save,load", [
    (2, {"w": "row", "emb": "col"}, {"w": "col", "emb": "row", "b": "row"}),
    (4, {"w": "col", "emb": "row", "b": "row"}, {"w": "row", "emb": "rep"}),
])
def test_dtensor_resharded_load_on_local_disk(tmp_path, world, save, load):
    opts = {"tensorstore": {"chunk_size": "2KiB", "shard_size": "8KiB"}}
    res = get_pool(world).run(tr.dtensor_roundtrip, str(tmp_path / "c"), save, load, opts)
    for r in res:
        assert all(r["equal"].values()), r["equal"]
        assert r["step"] == 7 and r["meta"] == {"note": "hello", "ranks": world}
        assert r["direct"] > 0  # reads went straight into the DTensors' local shards
        assert r["native_read"] > 0 and r["native_written"] > 0  # native chunk I/O, the default on files


@pytest.mark.parametrize("save_native,load_native", [(False, True), (True, False)])
def test_native_and_tensorstore_io_interoperate_on_two_ranks(tmp_path, save_native, load_native):
    grid = {"chunk_size": "2KiB", "shard_size": "8KiB"}
    res = get_pool(2).run(tr.dtensor_roundtrip, str(tmp_path / "c"), {"w": "row", "emb": "col"},
                          {"w": "col", "b": "row"}, {"tensorstore": {**grid, "native_file_io": save_native}},
                          {"tensorstore": {**grid, "native_file_io": load_native}})
    for r in res:
        assert all(r["equal"].values()), r["equal"]
        assert (r["native_written"] > 0) == save_native and (r["native_read"] > 0) == load_native


def test_dtensor_per_box_fallback_loads_exactly(tmp_path):
    opts = {"tensorstore": {"layout": "per_box", "chunk_size": "2KiB", "shard_size": None}}
    res = get_pool(2).run(tr.dtensor_roundtrip, str(tmp_path / "c"), {"w": "row", "emb": "col"}, {"w": "col"}, opts)
    assert all(all(r["equal"].values()) for r in res)
    assert (tmp_path / "c" / "w" / "part_32_0" / "zarr.json").exists()
    group = json.loads((tmp_path / "c" / "w" / "zarr.json").read_text())
    assert group["node_type"] == "group" and len(group["attributes"]["dcp_ext"]["parts"]) == 2


@pytest.mark.parametrize("save,load", [((2, 2, 1), (1, 2, 2)), ((1, 1, 4), (4, 1, 1)), ((2, 2, 1), (1, 1, 4))])
def test_megatron_tp_pp_reshard_with_the_resharding_planners(tmp_path, save, load):
    opts = {"tensorstore": {"chunk_size": "4KiB", "shard_size": "64KiB"}}
    res = get_pool(4).run(orf.reshard_planners, str(tmp_path / "c"), save, load, {**TS, **opts})
    for r in res:
        assert r["bad"] == [] and r["step"] == 3
    read, needed = sum(r["bytes_read"] for r in res), sum(r["bytes_needed"] for r in res)
    assert needed > 0 and read <= 1.6 * needed, (read, needed)  # 4 KiB chunks over 32-256 KiB tensors


def test_corrupt_chunk_fails_every_loading_rank(tmp_path):
    url = str(tmp_path / "c")
    opts = {"tensorstore": {"chunk_size": "1KiB", "shard_size": None}}
    get_pool(2).run(tr.dtensor_roundtrip, url, {"w": "row"}, {"w": "row"}, opts)
    _flip_a_byte(_chunk_files(tmp_path / "c" / "w")[0])
    msgs = get_pool(2).run(tr.load_expect_failure, url, {"w": "row"}, opts)
    assert all("CorruptCheckpointError" in m and "loading w" in m for m in msgs), msgs


# -- object stores ----------------------------------------------------------------------------

@pytest.mark.s3
def test_s3_save_and_resharded_load_on_two_ranks(s3_server):
    url = f"zarr3+s3://{s3_server.bucket}/ts-{uuid.uuid4().hex[:8]}/ck"
    opts = {**s3_server.options(), "tensorstore": {"chunk_size": "2KiB", "shard_size": "8KiB"}}
    res = get_pool(2).run(tr.dtensor_roundtrip, url, {"w": "row", "emb": "col"}, {"w": "col", "b": "row"}, opts)
    assert all(all(r["equal"].values()) and r["meta"]["ranks"] == 2 for r in res)
    info = inspect_checkpoint(url, **opts)
    assert info["world_size"] == 2 and info["tensors"]["w"]["size"] == [64, 48]
    assert verify_checkpoint(url, **opts).ok
    e = _err(lambda: dcp_ext.storage_reader(url, **{**opts, "s3": {**opts["s3"], "secret_access_key": "wrong"}})
             .read_metadata())
    assert "SignatureDoesNotMatch" in e or "credentials" in e


@pytest.mark.s3
def test_s3_megatron_reshard_on_four_ranks(s3_server):
    url = f"zarr3+s3://{s3_server.bucket}/ts-{uuid.uuid4().hex[:8]}/gpt"
    opts = {**s3_server.options(), "tensorstore": {"chunk_size": "8KiB", "shard_size": "64KiB"}}
    res = get_pool(4).run(orf.reshard_planners, url, (2, 2, 1), (4, 1, 1), {**TS, **opts})
    assert all(r["bad"] == [] for r in res)


@pytest.mark.gcs
def test_gcs_save_and_resharded_load_on_two_ranks(gcs_server):
    url = f"zarr3+gs://{gcs_server.bucket}/ts-{uuid.uuid4().hex[:8]}/ck"
    opts = {**gcs_server.options(), "tensorstore": {"chunk_size": "2KiB", "shard_size": "8KiB"}}
    res = get_pool(2).run(tr.dtensor_roundtrip, url, {"w": "col"}, {"w": "row", "emb": "col"}, opts)
    assert all(all(r["equal"].values()) for r in res)
    assert verify_checkpoint(url, **opts).ok
    res = get_pool(4).run(orf.reshard_planners, url + "-gpt", (1, 2, 2), (2, 2, 1),
                          {**TS, **gcs_server.options(), "tensorstore": {"chunk_size": "8KiB"}})
    assert all(r["bad"] == [] for r in res)
