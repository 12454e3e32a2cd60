"""Single-process tests of the pure parts of dcp_ext.optim (boxes, FlatBufferSpec, pack/unpack)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_ext.optim import (
    Box,
    FlatBufferSpec,
    FlatParam,
    OptimizerStateError,
    box_flat_range,
    flat_views,
    max_boxes,
    pack_flat,
    range_to_boxes,
    unpack_flat,
)
from tests import reference


@st.composite
def shape_and_range(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=5)))
    n = math.prod(shape)
    a = draw(st.integers(0, n))
    b = draw(st.integers(a, n))
    return shape, a, b


@settings(max_examples=400, deadline=None)
@given(shape_and_range())
def test_boxes_cover_range_exactly(sr):
    shape, a, b = sr
    boxes = range_to_boxes(shape, a, b)
    assert len(boxes) <= max_boxes(len(shape))
    n = math.prod(shape)
    mark = torch.zeros(n, dtype=torch.int64)
    idx = torch.arange(n).reshape(shape) if shape else torch.arange(n).reshape(())
    pos = a
    for box in boxes:
        assert box.numel > 0
        assert len(box.offsets) == len(box.sizes) == len(shape)
        for o, s, d in zip(box.offsets, box.sizes, shape):
            assert 0 <= o and o + s <= d
        region = idx[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
        flat = region.reshape(-1)
        # rectangular box == a contiguous run, in flat order, right after the previous box
        assert box.flat_start == pos
        assert torch.equal(flat, torch.arange(pos, pos + box.numel))
        assert box_flat_range(shape, box.offsets, box.sizes) == (pos, pos + box.numel)
        mark[flat] += 1
        pos += box.numel
    assert pos == b
    expect = torch.zeros(n, dtype=torch.int64)
    expect[a:b] = 1
    assert torch.equal(mark, expect)  # disjoint and exactly the range


def test_two_d_three_boxes():
    boxes = range_to_boxes((4, 5), 3, 17)
    assert boxes == [Box((0, 3), (1, 2), 3), Box((1, 0), (2, 5), 5), Box((3, 0), (1, 2), 15)]


def test_bound_is_reached_for_3d():
    # suffix of a row, suffix of a plane, full planes, prefix of a plane, prefix of a row
    boxes = range_to_boxes((4, 3, 5), 1 * 15 + 1 * 5 + 2, 3 * 15 + 1 * 5 + 3)
    assert len(boxes) == max_boxes(3) == 5


@settings(max_examples=200, deadline=None)
@given(shape_and_range())
def test_flat_views_fill_inverse(sr):
    shape, a, b = sr
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    flat = torch.zeros(b - a, dtype=torch.float64)
    for box, view in flat_views(flat, shape, a, b):
        view.copy_(full[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
    assert torch.equal(flat, full.reshape(-1)[a:b])


def test_range_errors():
    with pytest.raises(OptimizerStateError, match=r"flat range \[3, 13\) is out of bounds for shape \(3, 4\)"):
        range_to_boxes((3, 4), 3, 13)
    with pytest.raises(OptimizerStateError, match="not a contiguous run"):
        box_flat_range((3, 4), (0, 1), (2, 2))
    with pytest.raises(OptimizerStateError, match="out of bounds"):
        box_flat_range((3, 4), (2, 0), (2, 4))
    with pytest.raises(OptimizerStateError, match="cannot hold range"):
        flat_views(torch.zeros(3), (3, 4), 0, 5)


PARAMS = [("emb", (7, 3)), ("layers.0.w", (5, 4)), ("layers.0.b", (5,)), ("layers.1.w", (4, 5)), ("head", (3,))]


def test_build_layout_padding_and_buckets():
    spec = FlatBufferSpec.build(PARAMS, dp_size=3, dp_rank=1, alignment=4, bucket_numel=30)
    offs = {p.fqn: p.offset for p in spec.params}
    assert all(o % 4 == 0 for o in offs.values())
    assert offs == {"emb": 0, "layers.0.w": 24, "layers.0.b": 48, "layers.1.w": 56, "head": 76}
    # bucket 1: emb + layers.0.w end at 44 >= 30 -> padded to 48; bucket 2: 48..79 -> padded to 84
    assert spec.buckets == ((0, 48), (48, 84))
    assert all((b - a) % 12 == 0 for a, b in spec.buckets)
    assert len(spec.ranges) == len(spec.buckets)
    for (a, b), (ba, bb) in zip(spec.ranges, spec.buckets):
        assert b - a == (bb - ba) // 3 and a == ba + (bb - ba) // 3
    assert spec.local_numel == spec.numel // 3


def _full_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: torch.randn(s, generator=g) for f, s in PARAMS}


@pytest.mark.parametrize("alignment,bucket", [(1, None), (4, None), (8, 25), (3, 10)])
def test_dp_1_2_3_4_round_trip(alignment, bucket):
    full = _full_params()
    # DP 1 slice -> full buffer; then reslice for DP 2, 3, 4 from the *previous* DP size's slices
    prev_specs = [FlatBufferSpec.build(PARAMS, dp_size=1, dp_rank=0, alignment=alignment, bucket_numel=bucket)]
    prev_bufs = [pack_flat(prev_specs[0], full)]
    for dp in (2, 3, 4):
        # rebuild full params from the previous DP's slices, then pack the new slices
        rebuilt = {f: torch.full(s, float("nan")) for f, s in PARAMS}
        for spec, buf in zip(prev_specs, prev_bufs):
            unpack_flat(spec, buf, rebuilt)
        for f in full:
            assert torch.equal(rebuilt[f], full[f]), f
        specs = [FlatBufferSpec.build(PARAMS, dp_size=dp, dp_rank=r, alignment=alignment, bucket_numel=bucket)
                 for r in range(dp)]
        bufs = [pack_flat(s, rebuilt) for s in specs]
        # slices of all ranks tile the buffer: concatenated per bucket they equal the DP-1 buffer
        whole = torch.zeros(specs[0].numel)
        for s, b in zip(specs, bufs):
            pos = 0
            for a, e in s.ranges:
                whole[a:e] = b[pos:pos + e - a]
                pos += e - a
        full_spec = FlatBufferSpec(specs[0].params, specs[0].numel, specs[0].buckets, specs[0].buckets)
        assert torch.equal(whole, pack_flat(full_spec, full))  # padding stays zero
        prev_specs, prev_bufs = specs, bufs
    rebuilt = {f: torch.zeros(s) for f, s in PARAMS}
    for spec, buf in zip(prev_specs, prev_bufs):
        unpack_flat(spec, buf, rebuilt)
    for f in full:
        assert torch.equal(rebuilt[f], full[f])


@st.composite
def flat_cases(draw):
    shapes = [(f"p{i}", tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))))
              for i in range(draw(st.integers(1, 5)))]
    dp = draw(st.integers(1, 4))
    return shapes, dp, draw(st.integers(0, dp - 1)), draw(st.sampled_from([1, 2, 3, 8])), \
        draw(st.sampled_from([None, 1, 5, 17]))


@settings(max_examples=300, deadline=None)
@given(flat_cases())
def test_flat_buffer_matches_the_reference_layout(case):
    """FlatBufferSpec.build + pack_flat give exactly the slice the element-by-element reference of
    the Megatron layout gives (alignment, buckets, padding, rank ranges), and segments() skip
    exactly its padding cells."""
    shapes, dp, rank, alignment, bucket = case
    g = torch.Generator().manual_seed(len(shapes) * 31 + dp)
    full = {n: torch.randn(s, generator=g, dtype=torch.float64) + 1 for n, s in shapes}
    want, pad = reference.zero_slice(full, dp, rank, alignment, bucket, fill=0.0)
    spec = FlatBufferSpec.build(shapes, dp_size=dp, dp_rank=rank, alignment=alignment, bucket_numel=bucket)
    got = pack_flat(spec, full)
    assert torch.equal(got, want), (case, got, want)
    covered = torch.zeros(spec.local_numel, dtype=torch.bool)
    for seg in spec.segments():
        covered[seg.local_offset: seg.local_offset + seg.param_end - seg.param_start] = True
    assert torch.equal(covered, ~pad), case


def test_segments_cover_every_param_once():
    for dp in (1, 2, 3, 4):
        cover = {f: torch.zeros(math.prod(s), dtype=torch.int64) for f, s in PARAMS}
        for r in range(dp):
            spec = FlatBufferSpec.build(PARAMS, dp_size=dp, dp_rank=r, alignment=2, bucket_numel=20)
            for seg in spec.segments():
                cover[seg.fqn][seg.param_start:seg.param_end] += 1
        for f, c in cover.items():
            assert torch.equal(c, torch.ones_like(c)), (dp, f)


def test_spec_errors():
    with pytest.raises(OptimizerStateError, match=r"range \[0, 40\) is out of bounds of the buffer \[0, 32\)"):
        FlatBufferSpec((FlatParam("a", (4, 8), 0),), 32, ((0, 40),))
    with pytest.raises(OptimizerStateError, match=r"range \[8, 20\) overlaps range \[0, 10\)"):
        FlatBufferSpec((FlatParam("a", (4, 8), 0),), 32, ((0, 10), (8, 20)))
    with pytest.raises(OptimizerStateError, match=r"parameter 'b' at offset 4 overlaps 'a'"):
        FlatBufferSpec((FlatParam("a", (2, 3), 0), FlatParam("b", (2,), 4)), 32, ((0, 8),))
    with pytest.raises(OptimizerStateError, match=r"parameter 'a' ends at 40, beyond the buffer size numel=32"):
        FlatBufferSpec((FlatParam("a", (5, 8), 0),), 32, ((0, 8),))
    with pytest.raises(OptimizerStateError, match="lists parameter 'a' twice"):
        FlatBufferSpec((FlatParam("a", (2,), 0), FlatParam("a", (2,), 2)), 8, ((0, 8),))
    with pytest.raises(OptimizerStateError, match=r"parameter 'b' \[6, 10\) does not lie inside one bucket"):
        FlatBufferSpec((FlatParam("a", (2,), 0), FlatParam("b", (4,), 6)), 16, ((0, 8),), buckets=((0, 8), (8, 16)))
    with pytest.raises(OptimizerStateError, match=r"dp_rank 2 not in \[0, dp_size=2\)"):
        FlatBufferSpec.build(PARAMS, dp_size=2, dp_rank=2)
    with pytest.raises(OptimizerStateError, match="at least one parameter"):
        FlatBufferSpec.build([], dp_size=2)
    spec = FlatBufferSpec.build(PARAMS, dp_size=2, dp_rank=0, bucket_numel=10)
    with pytest.raises(OptimizerStateError, match="this rank owns .* ranges"):
        spec.start
    with pytest.raises(OptimizerStateError, match=r"tensor 'emb' has shape \(3, 7\) but the FlatBufferSpec says \(7, 3\)"):
        pack_flat(spec, {**_full_params(), "emb": torch.zeros(3, 7)})
    with pytest.raises(OptimizerStateError, match="no tensor for flat-buffer parameter 'head'"):
        pack_flat(spec, {f: t for f, t in _full_params().items() if f != "head"})


def test_flat_state_pieces_tile_global_params():
    """ZeRO slices at TP 2 x DP 3 with fused segments -> pieces tile every global parameter once
    per TP-distinct copy, each view aliasing the flat buffer with the right global values."""
    layout_mod = pytest.importorskip("dcp_ext.layout")
    from dcp_ext.optim import flat_state_pieces

    ShardSpec, ParallelLayout = layout_mod.ShardSpec, layout_mod.ParallelLayout
    rules = {"*qkv.weight": ShardSpec(0, (8, 4, 4)), "*out.weight": ShardSpec(1)}
    glob = {"layers.0.qkv.weight": torch.randn(16, 6), "layers.0.out.weight": torch.randn(6, 8),
            "layers.0.norm.weight": torch.randn(6)}
    tp, dp = 2, 3
    cover = {f: torch.zeros(t.shape, dtype=torch.int64) for f, t in glob.items()}
    for tr in range(tp):
        layout = ParallelLayout(tp_rank=tr, tp_size=tp, rules=rules)
        # the rank's local tensors, cut by the independent reference (not by dcp_ext.layout)
        local = {"layers.0.qkv.weight": reference.fused_split(glob["layers.0.qkv.weight"], 0, (8, 4, 4), tp, tr),
                 "layers.0.out.weight": reference.row_parallel(glob["layers.0.out.weight"], tp, tr),
                 "layers.0.norm.weight": glob["layers.0.norm.weight"].clone()}
        for dr in range(dp):
            spec = FlatBufferSpec.build([(f, tuple(t.shape)) for f, t in local.items()], dp_size=dp, dp_rank=dr,
                                        alignment=4)
            buf = pack_flat(spec, local)
            pieces = flat_state_pieces(spec, {"exp_avg": buf}, {"step": torch.tensor(3.0)}, layout=layout)
            for f, entry in pieces.items():
                assert entry["step"].replicated and entry["step"].pieces[0].view.item() == 3.0
                if "exp_avg" not in entry:
                    continue
                gp = entry["exp_avg"]
                assert gp.replicated == (f == "layers.0.norm.weight")
                # at most 3 rectangular chunks (partial first row, full rows, partial last row) per
                # parameter piece, i.e. per fused part of the rank's TP shard of a 2-d parameter
                per_part: dict[int, int] = {}
                for p in gp.pieces:
                    part = sum(p.global_offsets[0] >= b for b in (8, 12)) if "qkv" in f else 0
                    per_part[part] = per_part.get(part, 0) + 1
                assert max(per_part.values()) <= 3, (tr, dr, f, per_part)
                for p in gp.pieces:
                    assert p.global_fqn == f"optim.state.{f}.exp_avg"
                    box = tuple(slice(o, o + s) for o, s in zip(p.global_offsets, p.view.shape))
                    assert torch.equal(p.view, glob[f][box])
                    assert p.view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                    cover[f][box] += 1
    assert torch.equal(cover["layers.0.qkv.weight"], torch.ones(16, 6, dtype=torch.int64))
    assert torch.equal(cover["layers.0.out.weight"], torch.ones(6, 8, dtype=torch.int64))
    assert torch.equal(cover["layers.0.norm.weight"], torch.full((6,), tp, dtype=torch.int64))


def test_flat_state_errors():
    pytest.importorskip("dcp_ext.layout")
    from torch import nn

    from dcp_ext.optim import flat_state_pieces, optimizer_state
    from examples.zero_adam import ZeroAdam

    spec = FlatBufferSpec.build(PARAMS, dp_size=2, dp_rank=0, alignment=4)
    with pytest.raises(OptimizerStateError, match=r"flat state 'exp_avg' has shape \(5,\), expected \(40,\) for this rank.s slice"):
        flat_state_pieces(spec, {"exp_avg": torch.zeros(5)})
    model = nn.Linear(3, 2)
    opt = ZeroAdam(list(model.named_parameters()))
    st = optimizer_state(model, opt)
    sd = st.state_dict()
    assert set(sd["state"]) == {"weight", "bias"} and set(sd["state"]["weight"]) == {"master", "exp_avg",
                                                                                      "exp_avg_sq", "step"}
    bad = {"state": {"weight": {"exp_avg": torch.zeros(2, 3)}}, "param_groups": sd["param_groups"]}
    with pytest.raises(OptimizerStateError, match=r"flat optimizer state 'weight'.'exp_avg' was not produced by "
                                                  r"this OptimizerState.state_dict\(\)"):
        st.load_state_dict(bad)
    with pytest.raises(OptimizerStateError, match="ZeroAdam got the same parameter FQN twice"):
        ZeroAdam([("w", model.weight), ("w", model.bias)])


@st.composite
def zero_tp_cases(draw):
    tp = draw(st.sampled_from([1, 2, 3]))
    dim = draw(st.integers(0, 1))
    segments = tuple(tp * draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    other = draw(st.integers(1, 5))
    shape = (sum(segments), other) if dim == 0 else (other, sum(segments))
    dp = draw(st.integers(1, 4))
    alignment = draw(st.sampled_from([1, 2, 4]))
    bucket = draw(st.sampled_from([None, 3, 7]))
    return tp, dim, segments, shape, dp, alignment, bucket


@settings(max_examples=150, deadline=None)
@given(zero_tp_cases())
def test_flat_state_pieces_property(case):
    """Any 2-d fused parameter, TP size, DP size, alignment and bucketing: the ZeRO slices' pieces
    are exact boxes of the global parameter, tile it exactly once (a TP-replicated neighbour once per
    TP rank), and every fused part of a rank's shard gives at most 3 chunks per slice."""
    from dcp_ext.layout import ParallelLayout, ShardSpec
    from dcp_ext.optim import flat_state_pieces

    tp, dim, segments, shape, dp, alignment, bucket = case
    rules = {"w": ShardSpec(dim, segments)}
    glob = {"w": torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape),
            "norm": torch.arange(5, dtype=torch.float64) + 0.5}
    cover = {f: torch.zeros(t.shape, dtype=torch.int64) for f, t in glob.items()}
    bounds = [sum(segments[:i + 1]) for i in range(len(segments) - 1)]
    for tr in range(tp):
        lay = ParallelLayout(tp_rank=tr, tp_size=tp, rules=rules)
        local = {"w": reference.fused_split(glob["w"], dim, segments, tp, tr), "norm": glob["norm"].clone()}
        for dr in range(dp):
            spec = FlatBufferSpec.build([("norm", (5,)), ("w", tuple(local["w"].shape))], dp_size=dp, dp_rank=dr,
                                        alignment=alignment, bucket_numel=bucket)
            buf = pack_flat(spec, local)
            for f, entry in flat_state_pieces(spec, {"m": buf}, layout=lay).items():
                per_part: dict[int, int] = {}
                for p in entry["m"].pieces:
                    box = tuple(slice(o, o + s) for o, s in zip(p.global_offsets, p.view.shape))
                    assert p.global_shape == tuple(glob[f].shape)
                    assert torch.equal(p.view, glob[f][box])
                    cover[f][box] += 1
                    part = sum(p.global_offsets[dim] >= b for b in bounds) if f == "w" else 0
                    per_part[part] = per_part.get(part, 0) + 1
                assert max(per_part.values()) <= 3, (tr, dr, f, per_part)
    assert torch.equal(cover["w"], torch.ones(shape, dtype=torch.int64))
    assert torch.equal(cover["norm"], torch.full((5,), tp, dtype=torch.int64))


def test_flat_state_pieces_three_chunks_for_a_ragged_slice():
    """A slice starting and ending mid-row of one fused part gives exactly the 3 chunks."""
    from dcp_ext.layout import ParallelLayout, ShardSpec
    from dcp_ext.optim import flat_state_pieces

    lay = ParallelLayout(tp_rank=1, tp_size=2, rules={"w": ShardSpec(0, (8, 4))})
    glob = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
    local = glob[[4, 5, 6, 7, 10, 11]]  # rows 4-7 (second half of part 0) and 10-11 (of part 1)
    # a hand-made slice of local flat elements [2, 10): row 0 cols 2, rows 1-2, row 3 col 0
    spec = FlatBufferSpec((FlatParam("w", (6, 3), 0),), 18, ((2, 10),))
    pieces = flat_state_pieces(spec, {"m": pack_flat(spec, {"w": local})}, layout=lay)["w"]["m"].pieces
    assert [(p.global_offsets, tuple(p.view.shape)) for p in pieces] == [((4, 2), (1, 1)), ((5, 0), (2, 3)),
                                                                         ((7, 0), (1, 1))]
    for p in pieces:
        assert torch.equal(p.view, glob[p.global_offsets[0]:p.global_offsets[0] + p.view.shape[0],
                                        p.global_offsets[1]:p.global_offsets[1] + p.view.shape[1]])


def test_zeroadam_moved_to_examples():
    """ZeroAdam left the package (a reference kept simple rather than fast): the old names say where it went."""
    import dcp_ext
    import dcp_ext.optim

    for mod in (dcp_ext, dcp_ext.optim):
        with pytest.raises(AttributeError, match=r"ZeroAdam is no longer part of dcp_ext.*examples/zero_adam.py"):
            mod.ZeroAdam  # noqa: B018
    assert "ZeroAdam" not in dcp_ext.__all__
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        dcp_ext.optim.NoSuchName  # noqa: B018
