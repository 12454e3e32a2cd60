"""Single-process tests of the pure layout math in dcp_ext.layout (no process group)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_ext.errors import LayoutError
from dcp_ext.layout import (
    GlobalPieces,
    ParallelLayout,
    Piece,
    PieceMap,
    ShardSpec,
    TensorMapping,
    compose_global,
    local_box,
)


def megatron_split(full: torch.Tensor, dim: int, segments, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Reference: how Megatron shards a (fused) parameter, written independently of dcp_ext."""
    parts = full.split(list(segments), dim=dim) if segments else [full]
    return torch.cat([p.chunk(tp_size, dim=dim)[tp_rank] for p in parts], dim=dim)


def test_replicated_and_zero_dim():
    lay = ParallelLayout(tp_rank=1, tp_size=2)
    m = lay.map_tensor("norm.weight", (8,))
    assert m == TensorMapping("norm.weight", (8,), (PieceMap((0,), (0,), (8,)),))
    assert m.is_whole
    lay2 = ParallelLayout(tp_rank=1, tp_size=2, rules={"*": ShardSpec(0)})
    m0 = lay2.map_tensor("step", ())
    assert m0 == TensorMapping("step", (), (PieceMap((), (), ()),))


def test_column_row_and_vocab_parallel():
    rules = {"*.qkv.weight": ShardSpec(0), "*.proj.weight": ShardSpec(1), "embed.weight": ShardSpec(0)}
    lay = ParallelLayout(tp_rank=2, tp_size=4, rules=rules)
    assert lay.map_tensor("embed.weight", (5, 3)).pieces == (PieceMap((0, 0), (10, 0), (5, 3)),)
    assert lay.map_tensor("embed.weight", (5, 3)).global_shape == (20, 3)
    m = lay.map_tensor("layers.0.proj.weight", (6, 2))
    assert m.global_shape == (6, 8) and m.pieces == (PieceMap((0, 0), (0, 4), (6, 2)),)
    # negative dims count from the end
    assert lay.map_tensor("x", (6, 2), ShardSpec(-1)) == TensorMapping("x", (6, 8), (PieceMap((0, 0), (0, 4), (6, 2)),))


def test_fused_gqa_qkv_pieces():
    # 4 query heads, 2 kv heads, head dim 2 -> segments (8, 4, 4); TP=2: local rows 4+2+2
    lay = ParallelLayout(tp_rank=1, tp_size=2, rules={"*qkv*": ShardSpec(0, (8, 4, 4))})
    m = lay.map_tensor("layers.0.qkv.weight", (8, 3))
    assert m.global_shape == (16, 3)
    assert m.pieces == (
        PieceMap((0, 0), (4, 0), (4, 3)),
        PieceMap((4, 0), (10, 0), (2, 3)),
        PieceMap((6, 0), (14, 0), (2, 3)),
    )
    full = torch.arange(48.0).reshape(16, 3)
    local = lay.shard("layers.0.qkv.weight", full)
    assert torch.equal(local, megatron_split(full, 0, (8, 4, 4), 1, 2))


def test_pp_renumbering_offset_and_explicit():
    lay = ParallelLayout(pp_rank=1, pp_size=2, layer_offset=2)
    assert lay.global_fqn("model.layers.0.attn.w") == "model.layers.2.attn.w"
    assert lay.global_fqn("embed.weight") == "embed.weight"
    assert lay.local_fqn("model.layers.3.attn.w") == "model.layers.1.attn.w"
    assert lay.local_fqn("model.layers.1.attn.w") is None
    uneven = ParallelLayout(pp_rank=1, pp_size=2, stage_layers=(1, 2, 3))
    assert uneven.global_fqn("layers.0.w") == "layers.1.w"
    assert uneven.global_fqn("layers.2.w") == "layers.3.w"
    assert uneven.local_fqn("layers.3.w") == "layers.2.w"
    assert uneven.local_fqn("layers.0.w") is None
    custom = ParallelLayout(layer_pattern=r"h\.(\d+)\.", layer_offset=5)
    assert custom.global_fqn("transformer.h.1.mlp") == "transformer.h.6.mlp"
    m = uneven.map_tensor("layers.1.w", (2, 2))
    assert m.global_fqn == "layers.2.w"


def test_rules_match_global_fqn_too():
    lay = ParallelLayout(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, layer_offset=2,
                         rules={"layers.3.special": ShardSpec(0)})
    assert lay.map_tensor("layers.1.special", (2,)).pieces == (PieceMap((0,), (2,), (2,)),)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp_rank=2, tp_size=2), r"tp_rank=2 is out of range for tp_size=2 \(valid: 0..1\)"),
    (dict(pp_rank=-1), r"pp_rank must be an int >= 0"),
    (dict(dp_size=0), r"dp_size must be an int >= 1"),
    (dict(layer_pattern=r"layers\.\d+"), r"needs a group capturing the layer index"),
    (dict(layer_pattern=r"layers\.(\d+"), r"is not a valid regex"),
    (dict(stage_layers=(1, 1)), r"duplicate layer ids"),
    (dict(stage_layers=(0, 1), layer_offset=2), r"either ParallelLayout.stage_layers or layer_offset"),
    (dict(rules={"*.w": (0,)}), r"rules\['\*.w'\] must be a ShardSpec"),
])
def test_bad_layouts(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        ParallelLayout(**kwargs)


def test_bad_specs_and_shapes():
    with pytest.raises(LayoutError, match=r"segments must be positive ints"):
        ShardSpec(0, (4, 0))
    with pytest.raises(LayoutError, match=r"segments must not be empty"):
        ShardSpec(0, ())
    lay = ParallelLayout(tp_rank=0, tp_size=4, rules={"qkv": ShardSpec(0, (8, 6, 6))})
    with pytest.raises(LayoutError, match=r"qkv: fused segment of global size 6 \(segments \[8, 6, 6\]\) is not "
                                          r"divisible by tp_size=4"):
        lay.map_tensor("qkv", (5, 2))
    lay = ParallelLayout(tp_rank=0, tp_size=2, rules={"qkv": ShardSpec(0, (8, 4, 4))})
    with pytest.raises(LayoutError, match=r"qkv: local shape \[6, 2\] does not match ShardSpec\(dim=0, "
                                          r"segments=\[8, 4, 4\]\) at tp_size=2: dim 0 must be .* = 8, got 6"):
        lay.map_tensor("qkv", (6, 2))
    with pytest.raises(LayoutError, match=r"w: ShardSpec.dim=2 is out of range for a 2-d tensor of shape \[4, 4\]"):
        lay.map_tensor("w", (4, 4), ShardSpec(2))
    with pytest.raises(LayoutError, match=r"global size 5 of dim 0 is not divisible by tp_size=2"):
        lay.shard("w", torch.zeros(5), ShardSpec(0))
    st = ParallelLayout(pp_rank=1, pp_size=2, stage_layers=(2, 3))
    with pytest.raises(LayoutError, match=r"layers.2.w: local layer 2 does not exist on PP stage 1, whose "
                                          r"stage_layers are \[2, 3\]"):
        st.global_fqn("layers.2.w")


def test_piece_validation():
    with pytest.raises(LayoutError, match=r"Piece w: box offsets \[3\] sizes \[2\] lies outside the global shape \[4\]"):
        Piece("w", (4,), (3,), torch.zeros(2))
    with pytest.raises(LayoutError, match=r"same rank"):
        Piece("w", (4, 4), (0,), torch.zeros(2))
    with pytest.raises(LayoutError, match=r"must hold Piece objects"):
        GlobalPieces([torch.zeros(2)])  # type: ignore[list-item]
    p = Piece("w", [4, 4], [0, 2], torch.zeros(4, 2))
    assert p.global_offsets == (0, 2) and p.sizes == (4, 2) and p.nbytes == 32


def test_compose_detects_holes_and_disagreement():
    lay = ParallelLayout(tp_rank=0, tp_size=2)
    m = lay.map_tensor("w", (2,), ShardSpec(0))
    with pytest.raises(LayoutError, match="not fully covered"):
        compose_global([(m, torch.zeros(2))])
    with pytest.raises(LayoutError, match="mappings disagree"):
        compose_global([(m, torch.zeros(2)), (lay.map_tensor("v", (2,), ShardSpec(0)), torch.zeros(2))])


@st.composite
def sharded_tensors(draw):
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    tps = draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=2, max_size=3))
    lcm = 1
    for t in tps:
        import math

        lcm = lcm * t // math.gcd(lcm, t)
    fused = draw(st.booleans())
    if fused:
        segments = tuple(lcm * draw(st.integers(1, 2)) for _ in range(draw(st.integers(1, 3))))
        split_len = sum(segments)
    else:
        segments = None
        split_len = lcm * draw(st.integers(1, 2))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = split_len
    return tuple(shape), ShardSpec(dim, segments), tps


@settings(max_examples=150, deadline=None)
@given(sharded_tensors(), st.integers(0, 2))
def test_any_split_to_global_to_any_other_split_is_identity(case, pp_offset):
    shape, spec, tps = case
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    fqn = "layers.0.w"
    current = full
    for tp in tps:
        layouts = [ParallelLayout(tp_rank=r, tp_size=tp, pp_rank=0, pp_size=1, layer_offset=pp_offset)
                   for r in range(tp)]
        locals_ = [lay.shard(fqn, current, spec) for lay in layouts]
        for r, loc in enumerate(locals_):  # matches an independent Megatron-style split
            assert torch.equal(loc, megatron_split(full, spec.dim, spec.segments, r, tp))
        maps = [lay.map_tensor(fqn, loc.shape, spec) for lay, loc in zip(layouts, locals_)]
        assert {m.global_fqn for m in maps} == {f"layers.{pp_offset}.w"}
        # boxes of all ranks are disjoint and tile the global tensor
        vol = sum(torch.Size(p.sizes).numel() for m in maps for p in m.pieces)
        assert vol == full.numel()
        current = compose_global(list(zip(maps, locals_)))
        assert torch.equal(current, full)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True), st.integers(0, 5))
def test_stage_layers_fqn_roundtrip(stage_layers, local):
    lay = ParallelLayout(pp_rank=0, pp_size=2, stage_layers=tuple(stage_layers))
    if local < len(stage_layers):
        g = lay.global_fqn(f"m.layers.{local}.w")
        assert g == f"m.layers.{stage_layers[local]}.w"
        assert lay.local_fqn(g) == f"m.layers.{local}.w"
    else:
        with pytest.raises(LayoutError):
            lay.global_fqn(f"m.layers.{local}.w")


def test_local_box_is_a_view():
    t = torch.zeros(4, 6)
    v = local_box(t, PieceMap((1, 2), (0, 0), (2, 3)))
    v.fill_(1)
    assert t.sum() == 6 and t[1:3, 2:5].eq(1).all()


def test_layout_description_ranges():
    from dcp_ext.save_dedup import layer_ranges as _ranges

    assert _ranges([5, 0, 1, 2]) == "0-2,5"
    assert _ranges([3]) == "3"
    assert _ranges([]) == "none"
    lay = ParallelLayout(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, stage_layers=(2, 3))
    assert lay.describe() == "TPxPPxDP=2x2x1 (tp 1, pp 1 [layers 2,3], dp 0)"


# ---- whole models: any TP x PP split -> global -> any other TP x PP split ----------------------

H = 4  # hidden size of the property-test model


def _model_rules(tp_lcm: int) -> tuple[dict[str, ShardSpec], tuple[int, int, int]]:
    qkv = (2 * tp_lcm, tp_lcm, tp_lcm)  # GQA-like unequal fused parts, each divisible by every TP size
    return {"*.qkv.weight": ShardSpec(0, qkv), "*.qkv.bias": ShardSpec(0, qkv),
            "*.proj.weight": ShardSpec(1), "*.gate_up.weight": ShardSpec(0, (tp_lcm, tp_lcm)),
            "embed.weight": ShardSpec(0)}, qkv


def _model(n_layers: int, tp_lcm: int) -> dict[str, torch.Tensor]:
    _, qkv = _model_rules(tp_lcm)
    g = torch.Generator().manual_seed(n_layers * 100 + tp_lcm)
    full = {"embed.weight": torch.randn(2 * tp_lcm, H, generator=g)}
    for i in range(n_layers):
        full[f"layers.{i}.qkv.weight"] = torch.randn(sum(qkv), H, generator=g)
        full[f"layers.{i}.qkv.bias"] = torch.randn(sum(qkv), generator=g)
        full[f"layers.{i}.proj.weight"] = torch.randn(H, 3 * tp_lcm, generator=g)
        full[f"layers.{i}.gate_up.weight"] = torch.randn(2 * tp_lcm, H, generator=g)
        full[f"layers.{i}.norm.weight"] = torch.randn(H, generator=g)
    full["final_norm.weight"] = torch.randn(H, generator=g)
    return full


@st.composite
def model_splits(draw):
    """A model and several TP x PP splits of it: even splits use layer_offset, others stage_layers."""
    n_layers = draw(st.integers(1, 5))
    splits = []
    for _ in range(draw(st.integers(2, 3))):
        tp = draw(st.sampled_from([1, 2, 3, 4]))
        pp = draw(st.integers(1, n_layers))
        cuts = sorted(draw(st.lists(st.integers(1, n_layers - 1), min_size=pp - 1, max_size=pp - 1,
                                    unique=True))) if pp > 1 else []
        bounds = [0] + cuts + [n_layers]
        stages = [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:])]
        even = len({len(s) for s in stages}) == 1
        splits.append((tp, stages, even and draw(st.booleans())))
    return n_layers, splits


def _split_model(full: dict[str, torch.Tensor], tp: int, stages, use_offset: bool, rules):
    """Every rank's (layout, local state) at this split, Megatron-style (the first stage holds the
    embedding, the last one the final norm)."""
    ranks = []
    for pp_rank, layers in enumerate(stages):
        for tp_rank in range(tp):
            kw = dict(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=len(stages), rules=rules)
            lay = (ParallelLayout(**kw, layer_offset=layers[0]) if use_offset
                   else ParallelLayout(**kw, stage_layers=layers))
            local = {}
            for g, t in full.items():
                if g.startswith("layers."):
                    if int(g.split(".")[1]) not in layers:
                        continue
                elif g == "embed.weight" and pp_rank != 0:
                    continue
                elif g == "final_norm.weight" and pp_rank != len(stages) - 1:
                    continue
                lf = lay.local_fqn(g)
                assert lf is not None and lay.global_fqn(lf) == g
                local[lf] = lay.shard(lf, t)
            ranks.append((lay, local))
    return ranks


def _compose_model(ranks) -> dict[str, torch.Tensor]:
    groups: dict[str, list] = {}
    for lay, local in ranks:
        for lf, t in local.items():
            m = lay.map_tensor(lf, t.shape)
            groups.setdefault(m.global_fqn, []).append((m, t))
    return {g: compose_global(parts) for g, parts in groups.items()}


@settings(max_examples=60, deadline=None)
@given(model_splits())
def test_any_tp_pp_split_to_global_to_any_other_split_is_identity(case):
    n_layers, splits = case
    tp_lcm = 12  # divisible by every TP size drawn (1, 2, 3, 4)
    rules, _ = _model_rules(tp_lcm)
    full = _model(n_layers, tp_lcm)
    current = full
    for tp, stages, use_offset in splits:
        ranks = _split_model(current, tp, stages, use_offset, rules)
        for lay, local in ranks:  # every local tensor is the independent Megatron-style cut of `full`
            for lf, t in local.items():
                g = lay.global_fqn(lf)
                spec = lay.spec_for(lf) or lay.spec_for(g)
                want = full[g] if spec is None else megatron_split(full[g], spec.dim, spec.segments,
                                                                   lay.tp_rank, tp)
                assert torch.equal(t, want), (tp, stages, lf)
        current = _compose_model(ranks)
        assert current.keys() == full.keys()
        for g in full:
            assert torch.equal(current[g], full[g]), (tp, stages, g)
