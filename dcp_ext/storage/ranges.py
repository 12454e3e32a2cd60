"""Pure byte-range arithmetic for reading a sub-box of a C-contiguous stored tensor.

Given a stored chunk of shape ``shape`` and the box a rank needs (``offsets``,
``lengths``), :func:`box_spans` returns the contiguous byte spans to fetch and how the
fetched bytes map back to the box. Spans separated by less than ``gap`` bytes are merged
(reading a small gap is cheaper than another request), starting from the innermost
dimension, and at most ``max_spans`` spans are produced.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["BoxSpans", "box_spans", "merge_ranges"]


@dataclass(frozen=True)
class BoxSpans:
    """How to fetch a box: ``count`` spans of ``span_bytes`` each, at ``starts`` (bytes,
    relative to the tensor data). Packed one after another in a buffer, the box is the
    ``as_strided(lengths, strides)`` view of that buffer (``strides`` in elements)."""

    starts: tuple[int, ...]
    span_bytes: int
    strides: tuple[int, ...]
    lengths: tuple[int, ...]
    needed_bytes: int

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def exact(self) -> bool:
        """True when the spans hold exactly the needed bytes (no gaps read)."""
        return self.count * self.span_bytes == self.needed_bytes


def _c_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for j in range(len(shape) - 2, -1, -1):
        strides[j] = strides[j + 1] * shape[j + 1]
    return strides


def box_spans(shape: Sequence[int], offsets: Sequence[int], lengths: Sequence[int], esize: int,
              gap: int = 0, max_spans: int = 65536) -> BoxSpans:
    """Spans covering the box ``offsets + [0, lengths)`` of a C-contiguous ``shape`` array."""
    nd = len(shape)
    if not (len(offsets) == len(lengths) == nd):
        raise ValueError(f"box rank mismatch: shape {list(shape)}, offsets {list(offsets)}, "
                         f"lengths {list(lengths)}")
    for j in range(nd):
        if offsets[j] < 0 or lengths[j] < 0 or offsets[j] + lengths[j] > shape[j]:
            raise ValueError(f"box {list(offsets)}+{list(lengths)} is outside the stored shape {list(shape)}")
    needed = math.prod(lengths) * esize
    if nd == 0:
        return BoxSpans((0,), esize, (), (), esize)
    if needed == 0:
        return BoxSpans((), 0, tuple(_c_strides(lengths)), tuple(lengths), 0)
    st = _c_strides(shape)
    # span over dims [m, nd): its extent in elements
    m = nd - 1
    extent = lengths[m]
    while m > 0:
        inner_full = all(lengths[j] == shape[j] for j in range(m, nd))
        nspans = math.prod(lengths[:m])
        gap_bytes = (st[m - 1] - extent) * esize
        if inner_full or lengths[m - 1] == 1 or gap_bytes <= gap or nspans > max_spans:
            m -= 1
            extent = (lengths[m] - 1) * st[m] + extent
        else:
            break
    inner_start = sum(offsets[j] * st[j] for j in range(m, nd))
    starts = []
    for idx in itertools.product(*[range(offsets[j], offsets[j] + lengths[j]) for j in range(m)]):
        starts.append((sum(i * st[j] for j, i in enumerate(idx)) + inner_start) * esize)
    strides = [0] * nd
    for j in range(m, nd):
        strides[j] = st[j]
    packed = extent
    for j in range(m - 1, -1, -1):
        strides[j] = packed
        packed *= lengths[j]
    return BoxSpans(tuple(starts), extent * esize, tuple(strides), tuple(lengths), needed)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping/adjacent ``[start, end)`` ranges (input in any order)."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]
