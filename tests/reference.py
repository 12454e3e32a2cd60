"""An independent reference for the resharding and optimizer tests.

How Megatron-style models split their parameters over tensor-parallel (TP) ranks, number their
layers on pipeline (PP) stages and lay out ZeRO / distributed-optimizer flat buffers, written
here from the definitions (explicit row / column / head index lists, an element-by-element
buffer map) and importing nothing from ``dcp_ext``. The tests compare what ``dcp_ext`` loads
with these, so a bug in ``dcp_ext.layout`` or ``dcp_ext.optim`` cannot hide by sitting on both
sides of a comparison. ``tests/test_reference.py`` checks these functions on hand-worked cases.

Conventions (Megatron's, PyTorch ``[out, in]`` weights):

* column-parallel linear: output features (rows) split in ``tp`` contiguous blocks, rank ``r``
  holds block ``r``; row-parallel linear: input features (columns) split the same way;
* vocab-parallel embedding / LM head: the vocabulary is padded with zero rows to a multiple of
  the padding unit, then split in contiguous row blocks;
* fused QKV with grouped-query attention: ``[q heads | k groups | v groups]`` along the rows,
  ``head_dim`` rows per head; rank ``r`` holds query heads ``[r*nh/tp, (r+1)*nh/tp)`` and the
  key/value groups ``[r*nkv/tp, (r+1)*nkv/tp)`` those heads attend to, concatenated q, k, v;
* fused SwiGLU gate/up: ``[gate | up]`` rows, rank ``r`` holds its gate block then its up block;
* pipeline stage ``s`` holding global layers ``L`` names global layer ``L[i]`` ``layers.i``;
* ZeRO flat buffer: parameters concatenated in order, each starting at a multiple of
  ``alignment``; a bucket closes once it holds at least ``bucket_numel`` elements and is padded
  to a multiple of ``dp * alignment`` (at least one unit); DP rank ``r`` owns the ``r``-th of
  ``dp`` equal parts of every bucket, concatenated.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

# -- tensor parallelism ---------------------------------------------------------------------


def _block(n: int, tp: int, r: int) -> range:
    """Indices of rank ``r``'s contiguous block of ``n`` items split over ``tp`` ranks."""
    assert n % tp == 0, f"{n} does not split over {tp} ranks"
    per = n // tp
    return range(r * per, (r + 1) * per)


def _take(t: torch.Tensor, dim: int, idx: Sequence[int]) -> torch.Tensor:
    return t.index_select(dim, torch.tensor(list(idx), dtype=torch.long)).contiguous()


def column_parallel(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s rows (output features) of a column-parallel weight or bias."""
    return _take(w, 0, _block(w.shape[0], tp, r))


def row_parallel(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s columns (input features) of a row-parallel weight."""
    return _take(w, 1, _block(w.shape[1], tp, r))


def padded_vocab(vocab: int, unit: int) -> int:
    """The vocabulary size rounded up to a multiple of ``unit`` (Megatron's padding)."""
    return -(-vocab // unit) * unit


def pad_vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    """``w`` (``[vocab, hidden]``) with zero rows appended up to ``padded`` rows."""
    assert padded >= w.shape[0]
    return torch.cat([w, torch.zeros(padded - w.shape[0], *w.shape[1:], dtype=w.dtype)])


def vocab_parallel(w_padded: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s token rows of a (padded) vocab-parallel embedding or LM head."""
    return column_parallel(w_padded, tp, r)


def qkv_rows(n_heads: int, n_kv: int, head_dim: int, tp: int, r: int) -> list[int]:
    """Row indices of the fused ``[q | k | v]`` tensor that TP rank ``r`` holds (GQA)."""
    assert n_heads % n_kv == 0, "query heads must split into whole key/value groups"
    per_group = n_heads // n_kv
    heads = list(_block(n_heads, tp, r))
    groups = list(_block(n_kv, tp, r))
    # the rank's query heads attend exactly to its key/value groups
    assert sorted({h // per_group for h in heads}) == groups, (heads, groups)
    k0, v0 = n_heads * head_dim, (n_heads + n_kv) * head_dim
    rows = [h * head_dim + d for h in heads for d in range(head_dim)]
    rows += [k0 + g * head_dim + d for g in groups for d in range(head_dim)]
    rows += [v0 + g * head_dim + d for g in groups for d in range(head_dim)]
    return rows


def fused_qkv(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s local fused QKV weight or bias."""
    assert w.shape[0] == (n_heads + 2 * n_kv) * head_dim
    return _take(w, 0, qkv_rows(n_heads, n_kv, head_dim, tp, r))


def gate_up_rows(ffn: int, tp: int, r: int) -> list[int]:
    """Row indices of the fused ``[gate | up]`` tensor that TP rank ``r`` holds."""
    mine = list(_block(ffn, tp, r))
    return mine + [ffn + i for i in mine]


def gate_up(w: torch.Tensor, ffn: int, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s local fused gate/up weight or bias."""
    assert w.shape[0] == 2 * ffn
    return _take(w, 0, gate_up_rows(ffn, tp, r))


def fused_split(w: torch.Tensor, dim: int, parts: Sequence[int], tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s share of a tensor fused from ``parts`` (global sizes along ``dim``): its
    block of every part, concatenated in part order."""
    assert sum(parts) == w.shape[dim]
    idx, start = [], 0
    for n in parts:
        idx += [start + i for i in _block(n, tp, r)]
        start += n
    return _take(w, dim, idx)


# -- pipeline parallelism -------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)")


def even_stages(n_layers: int, pp: int) -> tuple[tuple[int, ...], ...]:
    """Layers of each stage, earlier stages taking one more when ``pp`` does not divide."""
    sizes = [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return tuple(tuple(range(a, a + n)) for a, n in zip(starts, sizes))


def stage_local_name(global_fqn: str, stage_layers: Sequence[int]) -> str | None:
    """The name a stage holding ``stage_layers`` gives ``global_fqn`` (``None``: not on it)."""
    m = _LAYER.search(global_fqn)
    if m is None:
        return global_fqn
    g = int(m.group(1))
    if g not in stage_layers:
        return None
    return f"{global_fqn[:m.start(1)]}{list(stage_layers).index(g)}{global_fqn[m.end(1):]}"


# -- ZeRO / distributed-optimizer flat buffers ------------------------------------------------


def zero_buffer(shapes: Sequence[tuple[str, Sequence[int]]], dp: int, alignment: int,
                bucket_numel: int | None) -> tuple[list[tuple[str, int] | None], list[tuple[int, int]]]:
    """The flat buffer element by element: ``(param name, flat index)`` or ``None`` (padding) for
    every position, and the ``[start, end)`` buckets."""
    unit = dp * alignment
    cells: list[tuple[str, int] | None] = []
    buckets: list[tuple[int, int]] = []
    start = 0

    def close() -> None:
        held = len(cells) - start
        size = max(unit, -(-held // unit) * unit)
        cells.extend([None] * (start + size - len(cells)))
        buckets.append((start, len(cells)))

    for name, shape in shapes:
        while len(cells) % alignment:
            cells.append(None)
        cells.extend((name, k) for k in range(math.prod(shape)))
        if bucket_numel is not None and len(cells) - start >= bucket_numel:
            close()
            start = len(cells)
    if len(cells) > start or not buckets:
        close()
    return cells, buckets


def zero_slice_cells(shapes: Sequence[tuple[str, Sequence[int]]], dp: int, rank: int, alignment: int,
                     bucket_numel: int | None) -> list[tuple[str, int] | None]:
    """What each element of DP rank ``rank``'s local slice buffer holds."""
    cells, buckets = zero_buffer(shapes, dp, alignment, bucket_numel)
    out: list[tuple[str, int] | None] = []
    for a, b in buckets:
        share = (b - a) // dp
        out += cells[a + rank * share: a + (rank + 1) * share]
    return out


def zero_slice(tensors: dict[str, torch.Tensor], dp: int, rank: int, alignment: int, bucket_numel: int | None,
               fill: float = 0.0, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DP rank ``rank``'s slice buffer of ``tensors`` (in their order) and its padding mask."""
    shapes = [(n, tuple(t.shape)) for n, t in tensors.items()]
    cells = zero_slice_cells(shapes, dp, rank, alignment, bucket_numel)
    dtype = dtype or next(iter(tensors.values())).dtype
    out = torch.full((len(cells),), fill, dtype=dtype)
    pad = torch.ones(len(cells), dtype=torch.bool)
    flat = {n: t.reshape(-1) for n, t in tensors.items()}
    for i, c in enumerate(cells):
        if c is not None:
            out[i] = flat[c[0]][c[1]]
            pad[i] = False
    return out, pad
