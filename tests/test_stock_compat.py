"""Issue 20, point 1: each difference from stock DCP that was found, reproduced and fixed (the
matrix of tests/test_parity.py covers the same ground broadly; these pin the details: the exact
reproductions, the commit rule of rank-local saves, error messages)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo

import dcp_ext
from dcp_ext.errors import CorruptCheckpointError, DcpExtError, IncompleteCheckpointError
from dcp_ext.storage import commit as C
from dcp_ext.storage import records
from dcp_ext.storage.manifest import ItemLocation
from dcp_ext.verify import verify_checkpoint
from tests import parity_rank_fns as P
from tests.support.errors import error_text as _error
from tests.support.torch_features import needs_dtype, needs_load_to_report_reader_errors, needs_rank_local_save

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")]


# ------------------------------------------------------------------------------ conj / neg views
def test_conj_and_neg_views_round_trip_as_in_the_issue(tmp_path):
    x = torch.tensor([1 + 2j, 3 - 4j]).conj()
    n = torch._neg_view(torch.tensor([1.0, 2.0]))
    dcp.save({"x": x, "n": n}, storage_writer=dcp_ext.storage_writer(str(tmp_path)))
    out = {"x": torch.zeros(2, dtype=torch.complex64), "n": torch.zeros(2)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path)))
    assert torch.equal(out["x"], torch.tensor([1 - 2j, 3 + 4j]))
    assert torch.equal(out["n"], torch.tensor([-1.0, -2.0]))


def test_async_save_with_our_writer_keeps_conj_values(tmp_path):
    """dcp.async_save stages with the writer when it is an AsyncStager (as FileSystemWriter is):
    DCP's DefaultStager, used otherwise, drops the conj bit and would store wrong values."""
    from torch.distributed.checkpoint.staging import AsyncStager

    w = dcp_ext.storage_writer(str(tmp_path))
    assert isinstance(w, AsyncStager)
    dcp.async_save({"x": torch.tensor([1 + 2j]).conj()}, storage_writer=w).result()
    out = {"x": torch.zeros(1, dtype=torch.complex64)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(str(tmp_path)))
    assert torch.equal(out["x"], torch.tensor([1 - 2j]))


def _old_compact_cpu(t: torch.Tensor) -> torch.Tensor:
    """records.compact_cpu before the fix: the conj/neg bit stayed in the record's pickle."""
    t = t.detach()
    if not t.is_contiguous() or t.storage_offset() != 0 \
            or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
    return t


def test_checkpoints_of_older_writers_honour_the_conj_bit(tmp_path, monkeypatch):
    """A manifest without ``views_resolved`` (an older dcp-ext) may hold records whose pickle
    carries the bit: our reader then reads whole records, which honours it."""
    monkeypatch.setattr(records, "compact_cpu", _old_compact_cpu)
    src = {"x": torch.tensor([1 + 2j, 3 - 4j, 5j]).conj(), "n": torch._neg_view(torch.arange(4.0))}
    dcp.save(src, storage_writer=dcp_ext.storage_writer(str(tmp_path)))
    monkeypatch.undo()
    man = tmp_path / C.MANIFEST_NAME
    doc = json.loads(man.read_bytes())
    assert doc.pop("views_resolved") is True
    man.write_text(json.dumps(doc))
    out = {"x": torch.zeros(3, dtype=torch.complex64), "n": torch.zeros(4)}
    r = dcp_ext.storage_reader(str(tmp_path))
    dcp.load(out, storage_reader=r)
    assert torch.equal(out["x"], torch.tensor([1 - 2j, 3 + 4j, -5j]))
    assert torch.equal(out["n"], -torch.arange(4.0))
    assert r.stats.bytes_read == sum(loc.length for loc in r.locations.values())  # whole records


# ---------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name", ["float8_e8m0fnu", "uint64", "complex32",
                                  pytest.param("float4_e2m1fn_x2", marks=needs_dtype("float4_e2m1fn_x2"))])
def test_newest_dtypes_load_from_our_own_checkpoints(tmp_path, name):
    d = getattr(torch, name)
    t = P.filled(d, (4, 3), 5)
    url = str(tmp_path / str(d))
    dcp.save({"t": t}, storage_writer=dcp_ext.storage_writer(url))
    out = {"t": P.zeros(d, (4, 3))}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    assert P.tensor_bytes(out["t"]) == P.tensor_bytes(t), d


def test_a_dtype_this_torch_lacks_is_named(tmp_path):
    dcp.save({"t": torch.ones(2)}, storage_writer=dcp_ext.storage_writer(str(tmp_path)))
    man = tmp_path / C.MANIFEST_NAME
    man.write_text(man.read_text().replace('"dtype":"float32"', '"dtype":"float3_e1m1"'))
    msg = _error(lambda: dcp_ext.storage_reader(str(tmp_path)).read_metadata())
    assert f"names the dtype 'float3_e1m1', which torch {torch.__version__} does not have" in msg


# ------------------------------------------------------------------------------ pickling
def test_stores_pickle_after_use(tmp_path):
    """A store that has read (open descriptors, a lock) still pickles; the copy opens its own."""
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(10)}, storage_writer=dcp_ext.storage_writer(url))
    for options in ({}, {"backend": "fsspec"}):
        r = dcp_ext.storage_reader(url, **options)
        out = {"t": torch.zeros(10, dtype=torch.long)}
        dcp.load(out, storage_reader=r)
        r2 = pickle.loads(pickle.dumps(r))
        out2 = {"t": torch.zeros(10, dtype=torch.long)}
        dcp.load(out2, storage_reader=r2)
        assert torch.equal(out2["t"], torch.arange(10)) and r2.store is not r.store
        w = pickle.loads(pickle.dumps(dcp_ext.storage_writer(str(tmp_path / f"w{len(options)}"), **options)))
        dcp.save({"t": torch.arange(3)}, storage_writer=w)


# -------------------------------------------------------------- storage_meta and storage_data
def test_metadata_is_what_stock_returns(tmp_path):
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(10), "o": {"a": 1}}, storage_writer=dcp_ext.storage_writer(url))
    r = dcp_ext.storage_reader(url)
    md = r.read_metadata()
    stock = FileSystemReader(url).read_metadata()
    assert md.storage_meta.checkpoint_id == url == os.fspath(stock.storage_meta.checkpoint_id)
    assert md.storage_meta.save_id == stock.storage_meta.save_id
    assert all(type(v) is _StorageInfo for v in md.storage_data.values())
    assert {k: (v.relative_path, v.offset, v.length) for k, v in md.storage_data.items()} == \
        {k: (v.relative_path, v.offset, v.length) for k, v in stock.storage_data.items()}
    # our richer locations stay on the reader
    assert all(isinstance(v, ItemLocation) and v.checksums is not None for v in r.locations.values())


# ------------------------------------------------------------------------------ _extensions
def test_extensions_are_validated_and_refused_where_they_cannot_work(tmp_path):
    msg = _error(lambda: dcp_ext.storage_writer(str(tmp_path), _extensions=["zstd"]))
    assert "_extensions: 'zstd' is a str, not a torch.distributed.checkpoint._extension.StreamTransformExtension" in msg
    msg = _error(lambda: dcp_ext.storage_writer(str(tmp_path), _extensions=P.ZlibTransform()))
    assert "_extensions: expected a sequence of StreamTransformExtension instances, got ZlibTransform" in msg
    msg = _error(lambda: dcp_ext.storage_writer(str(tmp_path / "d"), cache=str(tmp_path / "fast"),
                                                _extensions=[P.ZlibTransform()]))
    assert "_extensions (stream transforms) are not supported by tiered writers" in msg


def test_transformed_items_are_checksummed_and_read_by_stock(tmp_path):
    url = str(tmp_path / "ck")
    state = {"t": torch.arange(1000.0), "o": [1, 2]}
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, _extensions=[P.ZlibTransform()]))
    out = {"t": torch.zeros(1000), "o": None}
    dcp.load(out, storage_reader=FileSystemReader(url, _extension_registry=P.zlib_registry()))
    assert torch.equal(out["t"], state["t"]) and out["o"] == [1, 2]
    assert verify_checkpoint(url).ok
    data = tmp_path / "ck" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert not verify_checkpoint(url).ok


# --------------------------------------------------------------------- use_collectives=False
def _rank_local_save(url: str, value: float, **opts) -> None:
    dcp.save({"t": torch.full((4,), value), "u": torch.arange(3)}, storage_writer=dcp_ext.storage_writer(url, **opts),
             use_collectives=False)


def _files(path) -> list[str]:
    return sorted(os.listdir(path))


@needs_rank_local_save
def test_rank_local_save_commits_its_part_and_stock_reads_it(tmp_path):
    url = str(tmp_path / "ck")
    _rank_local_save(url, 1.0)
    assert _files(url) == ["__0.dcp_ext.json", "__0.metadata", "__0_0.distcp"]
    for reader in (dcp_ext.storage_reader(url), FileSystemReader(url)):
        out = {"t": torch.zeros(4)}
        dcp.load(out, storage_reader=reader)
        assert torch.equal(out["t"], torch.ones(4))
    # stock's rank-local checkpoint, read by us
    stock = str(tmp_path / "stock")
    dcp.save({"t": torch.full((4,), 2.0)}, storage_writer=FileSystemWriter(stock), use_collectives=False)
    out = {"t": torch.zeros(4)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(stock))
    assert torch.equal(out["t"], torch.full((4,), 2.0))


@needs_rank_local_save
def test_rank_local_overwrite_is_refused_per_part(tmp_path):
    url = str(tmp_path / "ck")
    _rank_local_save(url, 1.0)
    msg = _error(lambda: _rank_local_save(url, 2.0))
    assert "CheckpointExistsError" in msg and "Checkpoint already exists: " in msg
    assert "already holds a complete checkpoint (rank 0's rank-local part); refusing to overwrite it" in msg
    _rank_local_save(url, 3.0, overwrite=True)
    out = {"t": torch.zeros(4)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    assert torch.equal(out["t"], torch.full((4,), 3.0))


@needs_rank_local_save
def test_rank_local_overwrite_touches_only_its_own_part(tmp_path):
    """Rank 0's overwrite removes rank 0's stale data only; another rank's part stays committed."""
    url = tmp_path / "ck"
    _rank_local_save(str(url), 1.0, files_per_rank=2)  # two data files of rank 0
    for name in ("__0.metadata", "__0.dcp_ext.json", "__0_0.distcp"):  # a committed part of "rank 1"
        (url / name.replace("__0", "__1")).write_bytes((url / name).read_bytes())
    _rank_local_save(str(url), 2.0, overwrite=True, files_per_rank=1)
    assert _files(url) == ["__0.dcp_ext.json", "__0.metadata", "__0_0.distcp",
                           "__1.dcp_ext.json", "__1.metadata", "__1_0.distcp"]
    assert C.commit_status(dcp_ext.storage_reader(str(url)).store).ranks == (0, 1)


@needs_rank_local_save
def test_collective_save_over_a_rank_local_checkpoint(tmp_path):
    url = str(tmp_path / "ck")
    _rank_local_save(url, 1.0)
    msg = _error(lambda: dcp.save({"t": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(url)))
    assert "CheckpointExistsError" in msg and "already holds a complete checkpoint (rank 0's rank-local part)" in msg
    dcp.save({"t": torch.full((4,), 5.0)}, storage_writer=dcp_ext.storage_writer(url, overwrite=True))
    assert _files(url) == [".dcp_ext.json", ".metadata", "__0_0.distcp"]  # the part is un-committed, then gone


@needs_rank_local_save
def test_rank_local_save_over_a_global_checkpoint_uncommits_it(tmp_path):
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.ones(4)}, storage_writer=dcp_ext.storage_writer(url))
    msg = _error(lambda: _rank_local_save(url, 2.0))
    assert "Checkpoint already exists: " in msg and "(rank 0's" not in msg
    _rank_local_save(url, 2.0, overwrite=True)
    assert ".metadata" not in _files(url) and "__0.metadata" in _files(url)


@needs_rank_local_save
def test_rank_local_locations_are_explained(tmp_path):
    url = str(tmp_path / "ck")
    _rank_local_save(url, 1.0)
    (tmp_path / "ck" / "__1_0.distcp").write_bytes(b"a part whose save died")
    r = dcp_ext.storage_reader(url)
    with pytest.raises(IncompleteCheckpointError, match=r"holds a rank-local checkpoint \(saved with "
                                                        r"use_collectives=False; parts of ranks \[0\]\) and no "
                                                        r"global \.metadata: each rank loads its own part"):
        r.read_metadata()
    with pytest.raises(IncompleteCheckpointError, match=r"has no committed rank-local part of rank 1: no "
                                                        r"__1\.metadata \(rank 1's save with use_collectives="
                                                        r"False did not finish there; committed parts: ranks "
                                                        r"\[0\]\); refusing to load it"):
        r.read_metadata(rank=1)
    assert r.read_metadata(rank=0).state_dict_metadata["t"].size == torch.Size([4])


@needs_rank_local_save
@needs_load_to_report_reader_errors
def test_rank_local_across_ranks_with_a_failed_rank(ranks, tmp_path):
    """2 gloo ranks save rank-local parts; rank 1's part is then lost (its save died): rank 0
    still loads its part, rank 1's load is refused with the reason, nothing is mixed."""
    res = ranks(2).run(P.rank_local_with_a_lost_part, str(tmp_path / "ck"), timeout=300)
    assert res[0]["before"] == res[1]["before"] == "ok"
    for r in res:  # DCP's load is collective: every rank learns that rank 1's part is missing
        assert "has no committed rank-local part of rank 1" in r["after"], r


@needs_rank_local_save
def test_corrupt_rank_local_manifest_is_named(tmp_path):
    url = str(tmp_path / "ck")
    _rank_local_save(url, 1.0)
    (tmp_path / "ck" / "__0.metadata").write_bytes(b"not the metadata of this manifest")
    with pytest.raises(CorruptCheckpointError, match=r"__0\.metadata does not match __0\.dcp_ext\.json"):
        dcp_ext.storage_reader(url).read_metadata(rank=0)


def test_bad_extensions_on_a_writer_built_directly(tmp_path):
    from dcp_ext.storage.fs import LocalStore
    from dcp_ext.storage.writer import ExtStorageWriter

    with pytest.raises(DcpExtError, match="is a int, not a"):
        ExtStorageWriter(LocalStore(str(tmp_path)), dcp_ext.Config(), extensions=[3])
