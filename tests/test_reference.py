"""The independent reference (tests/reference.py) on small hand-worked cases: the expected values
below are written out by hand from the definitions, not computed."""

from __future__ import annotations

import pytest
import torch

from tests import reference as ref


def _rows(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t[:, 0]]


def test_column_row_and_vocab_parallel():
    w = torch.arange(24).reshape(6, 4)  # row i holds 4i .. 4i+3
    assert _rows(ref.column_parallel(w, 3, 1)) == [8, 12]
    assert ref.row_parallel(w, 2, 1).tolist() == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19], [22, 23]]
    emb = torch.arange(1, 6).reshape(5, 1).float()  # 5 tokens, padded to a multiple of 4 -> 8 rows
    assert ref.padded_vocab(5, 4) == 8 and ref.padded_vocab(8, 4) == 8
    padded = ref.pad_vocab(emb, 8)
    assert padded[:, 0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert ref.vocab_parallel(padded, 2, 1)[:, 0].tolist() == [5, 0, 0, 0]


def test_fused_qkv_with_grouped_query_attention():
    # 4 query heads, 2 key/value groups, head_dim 2: rows q0 q0 q1 q1 q2 q2 q3 q3 k0 k0 k1 k1 v0 v0 v1 v1
    assert ref.qkv_rows(4, 2, 2, 2, 0) == [0, 1, 2, 3, 8, 9, 12, 13]
    assert ref.qkv_rows(4, 2, 2, 2, 1) == [4, 5, 6, 7, 10, 11, 14, 15]
    assert ref.qkv_rows(8, 4, 1, 4, 3) == [6, 7, 11, 15]
    with pytest.raises(AssertionError):  # TP 4 over 2 groups would split a group between ranks
        ref.qkv_rows(4, 2, 1, 4, 0)
    w = torch.arange(16).reshape(16, 1)
    assert _rows(ref.fused_qkv(w, 4, 2, 2, 2, 1)) == [4, 5, 6, 7, 10, 11, 14, 15]


def test_gate_up_and_generic_fused_split():
    assert ref.gate_up_rows(4, 2, 1) == [2, 3, 6, 7]
    w = torch.arange(8).reshape(8, 1)
    assert _rows(ref.gate_up(w, 4, 2, 0)) == [0, 1, 4, 5]
    m = torch.arange(12).reshape(2, 6)  # parts of 4 and 2 columns, TP 2
    assert ref.fused_split(m, 1, (4, 2), 2, 1).tolist() == [[2, 3, 5], [8, 9, 11]]


def test_pipeline_stages():
    assert ref.even_stages(4, 3) == ((0, 1), (2,), (3,))
    assert ref.even_stages(4, 2) == ((0, 1), (2, 3))
    assert ref.stage_local_name("model.layers.3.mlp.w", (2, 3)) == "model.layers.1.mlp.w"
    assert ref.stage_local_name("model.layers.1.mlp.w", (2, 3)) is None
    assert ref.stage_local_name("embed.weight", (2, 3)) == "embed.weight"


def test_zero_buffer_alignment_buckets_and_rank_slices():
    # a: 3 elements, b: 2, c: 5; alignment 2, dp 2 (unit 4), buckets close at >= 5 elements
    shapes = [("a", (3,)), ("b", (2,)), ("c", (5,))]
    cells, buckets = ref.zero_buffer(shapes, 2, 2, 5)
    # a at 0..2, pad 3, b at 4..5 (6 >= 5: bucket [0, 8)), c at 8..12 (5 >= 5: bucket [8, 16))
    assert buckets == [(0, 8), (8, 16)]
    names = ["".join(c[0] if c else "." for c in cells)]
    assert names == ["aaa.bb..ccccc..."]
    assert ref.zero_slice_cells(shapes, 2, 1, 2, 5) == [("b", 0), ("b", 1), None, None,
                                                        ("c", 4), None, None, None]
    vals, pad = ref.zero_slice({"a": torch.tensor([1., 2, 3]), "b": torch.tensor([4., 5]),
                                "c": torch.tensor([6., 7, 8, 9, 10])}, 2, 0, 2, 5, fill=-1)
    assert vals.tolist() == [1, 2, 3, -1, 6, 7, 8, 9] and pad.tolist() == [False] * 3 + [True] + [False] * 4
    # one bucket, no alignment, dp 3: 10 elements padded to 12, 4 each
    cells, buckets = ref.zero_buffer(shapes, 3, 1, None)
    assert buckets == [(0, 12)] and cells[10:] == [None, None]
