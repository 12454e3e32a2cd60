"""Property tests for the byte-range math behind ranged reads, and the record tap."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_ext.integrity import BlockHasher, ItemChecksums, checksum
from dcp_ext.storage.base import BlobWriter
from dcp_ext.storage.ranges import box_spans, merge_ranges
from dcp_ext.storage.records import write_tensor_record, zip_crc_disabled


@st.composite
def boxes(draw):
    nd = draw(st.integers(0, 4))
    shape = [draw(st.integers(1, 7)) for _ in range(nd)]
    offs = [draw(st.integers(0, s - 1)) for s in shape]
    lens = [draw(st.integers(1, s - o)) for s, o in zip(shape, offs)]
    return shape, offs, lens


@settings(max_examples=400, deadline=None)
@given(boxes(), st.sampled_from([0, 4, 16, 64, 10_000]), st.sampled_from([1, 2, 5, 65536]),
       st.sampled_from([torch.int8, torch.int16, torch.float32, torch.float64]))
def test_box_spans_extract_exactly_the_box(box, gap, max_spans, dtype):
    shape, offs, lens = box
    t = torch.arange(torch.Size(shape).numel()).to(dtype).reshape(shape)
    es = t.element_size()
    bs = box_spans(shape, offs, lens, es, gap, max_spans)
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    buf = torch.cat([raw[s:s + bs.span_bytes] for s in bs.starts])
    view = buf.view(dtype).as_strided(bs.lengths, bs.strides)
    assert torch.equal(view, t[tuple(slice(o, o + n) for o, n in zip(offs, lens))])
    assert bs.count <= max(max_spans, 1) or bs.count == 1
    if gap == 0 and max_spans == 65536:
        assert bs.exact  # no gap is ever read when merging is not allowed
    assert list(bs.starts) == sorted(bs.starts)


def test_box_spans_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside the stored shape"):
        box_spans([4, 4], [2, 0], [3, 4], 4)
    with pytest.raises(ValueError, match="box rank mismatch"):
        box_spans([4, 4], [0], [4], 4)


def test_merge_ranges():
    assert merge_ranges([(5, 8), (0, 2), (2, 4), (7, 9)]) == [(0, 4), (5, 9)]


@settings(deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 7))
def test_block_hasher_matches_direct_blocks(data, nsplit):
    h = BlockHasher(512)
    step = max(1, len(data) // nsplit)
    for i in range(0, len(data), step):
        h.update(data[i:i + step])
    assert h.finish() == [checksum(data[i:i + 512]) for i in range(0, len(data), 512)]
    assert ItemChecksums(0, 5000, 512).block_range(700, 1100) == (512, 1536)


class _Mem(BlobWriter):
    def __init__(self):
        self.b = bytearray()

    def write(self, d):
        self.b += bytes(d)
        return len(d)

    def tell(self):
        return len(self.b)

    def close(self):
        pass

    def abort(self):
        pass


@pytest.mark.parametrize("t", [torch.arange(3000.0).reshape(30, 100), torch.tensor(5), torch.zeros(0),
                               torch.randn(10, 10).t(), torch.arange(10, dtype=torch.bfloat16),
                               torch.arange(100.0)[10:20]])
def test_record_tap_locates_raw_data(t):
    out = _Mem()
    out.write(b"x" * 77)  # records start mid-file
    with zip_crc_disabled():
        loc = write_tensor_record(out, "f", t, 4096)
    rec = bytes(out.b[loc.offset:loc.offset + loc.length])
    assert torch.equal(torch.load(io.BytesIO(rec), weights_only=True), t)
    raw = rec[loc.data_offset:loc.data_offset + loc.data_length]
    if t.numel():
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=t.dtype).reshape(t.shape), t.contiguous())
    c = loc.checksums
    assert c.blocks == [checksum(raw[i:i + 4096]) for i in range(0, len(raw), 4096)]
    assert c.rest == checksum(rec[loc.data_offset + loc.data_length:], checksum(rec[:loc.data_offset]))
    assert torch.serialization.get_crc32_options() is True  # restored

