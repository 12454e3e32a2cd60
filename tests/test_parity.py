"""Everything stock DCP accepts, we accept, with the same result (issue 20, point 2).

The matrix: state dicts (every DCP dtype, 0-dim, empty, views, non-contiguous, conj/neg views,
DTensor, ShardedTensor, nested containers, objects) x entry points (``dcp.save``/``load``,
``async_save`` with the thread and the process executor, with and without our PooledStager,
``_extensions``, a reused writer with ``checkpoint_id`` and ``overwrite``, ``no_dist``,
``use_collectives=False``) x backends (local, memory fsspec, fsspec on files, S3 and GCS test
servers). In every cell the same state is saved by stock's writer and by ours and each checkpoint
is loaded by both readers: ours -> ours, ours -> stock and stock -> ours must equal the source
values (computed by the test from the source state, byte for byte) and stock -> stock, and every
reader's ``read_metadata()`` must say what stock's says.

Kept fast: the single-process cells cover the whole state matrix on local and memory stores;
gloo cells share one 2-rank pool; S3 and GCS (slow here: one server each on 2 shared cores) run a
representative sub-matrix: ``dcp.save``, the process executor with our PooledStager (pickled
writer, shared-memory staging) and rank-local metadata, plus every dtype through ranged and
resharded reads.

Where stock itself cannot do something (its async stagers cannot stage quantized tensors,
ShardedTensors or conj DTensors in torch 2.13), those kinds are left out of that entry point:
both writers fail there, before any writer is involved.
"""

from __future__ import annotations

import uuid

import pytest

from tests import parity_rank_fns as P
from tests.support.torch_features import needs_one_rank_partial_save, needs_rank_local_save, stock_loads_dtype

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint"),
              pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")]

#: every kind a single process can build
SINGLE = ("dtypes", "scalars", "empty", "views", "conj", "nested", "objects", "quantized")
#: what stock's async stagers can stage (no quantized tensors)
SINGLE_ASYNC = tuple(k for k in SINGLE if k != "quantized")
RANKS = SINGLE + ("dtensor", "dtensor_conj", "sharded")
#: no ShardedTensor, conj DTensor or quantized tensor: stock's stagers fail on them
RANKS_ASYNC = SINGLE_ASYNC + ("dtensor",)
#: our PooledStager stages conj DTensors (and refuses ShardedTensors, as its docs say)
RANKS_POOLED = RANKS_ASYNC + ("dtensor_conj",)
#: entry points whose staging is BlockingAsyncStager (stock FileSystemWriter's, and ours, which
#: stages the same way): it rebuilds tuple subclasses as tuples, so a torch.Size object comes
#: back as a tuple, from stock's writer as from ours
TUPLE_STAGING = ("async_thread", "async_process")
ASYNC_ENTRIES = ("async_thread", "async_process", "async_process_pooled")

LOCAL = {"name": "local"}
MEMORY = {"name": "memory"}
FSSPEC_FILES = {"name": "fsspec_files", "ours": {"backend": "fsspec"}}


def _entries(*names: str, ranks: bool = False) -> list:
    """The entry points, each marked to skip where the running torch lacks its stock feature."""
    marks = {"rank_local": [needs_rank_local_save], "no_dist": [needs_one_rank_partial_save] if ranks else []}
    return [pytest.param(n, marks=marks.get(n, [])) for n in names]


def _kinds(entry: str) -> tuple[str, ...]:
    return RANKS_POOLED if entry == "async_process_pooled" else RANKS_ASYNC if entry in ASYNC_ENTRIES else RANKS


def _expected(res: dict, entry: str) -> dict:
    exp = res["expected"]
    if entry in TUPLE_STAGING and "obj" in exp:
        exp = dict(exp, obj=dict(exp["obj"], size=("tuple", exp["obj"]["size"][1])))
    return exp


def check_cell(res: dict, entry: str) -> None:
    """Every direction loads the source values; every reader's metadata says what stock's says."""
    exp = _expected(res, entry)
    for way, got in res["loaded"].items():
        assert not (isinstance(got, tuple) and got[0] == "error"), (way, got[1][-3000:])
        bad = sorted(k for k in exp if got.get(k) != exp[k]) + sorted(set(got) - set(exp))
        assert not bad, f"{way}: {bad}"
    ref = res["read_md"]["stock->stock"]
    assert isinstance(ref, dict), ref
    assert ref["checkpoint_id"] == "<location>" and ref["storage_types"] == [
        "torch.distributed.checkpoint.filesystem._StorageInfo"]
    for way, md in res["read_md"].items():
        assert md == ref, (way, {k: (md[k], ref[k]) for k in ref if md[k] != ref[k]} if isinstance(md, dict) else md)
    stock = res["saved_md"]["stock"]
    # torch 2.9's FileSystemWriter.finish fills a copy of the metadata, so its dcp.save returns
    # one without storage data or checkpoint id (2.7 and 2.13 return the filled one, as ours does):
    # compare what stock's holds then
    unfilled = stock is not None and stock["checkpoint_id"] is None and not stock["storage_keys"]
    for w, md in res["saved_md"].items():  # what dcp.save returned (None: async returns nothing)
        if md is not None or stock is not None:
            if unfilled and md is not None:
                md = dict(md, checkpoint_id=None, storage_keys=[], storage_types=[])
            assert md == stock, w


# ------------------------------------------------------------------ one process, whole state matrix
@pytest.mark.parametrize("backend", [LOCAL, MEMORY], ids=lambda b: b["name"])
@pytest.mark.parametrize("entry", _entries("save", "async_thread", "checkpoint_id", "no_dist", "rank_local",
                                           "extensions"))
def test_single_process(tmp_path, backend, entry):
    if entry == "extensions" and backend is MEMORY:
        pytest.skip("stock FsspecReader takes no extension registry: _extensions is covered on local files")
    root = str(tmp_path) if backend is LOCAL else f"memory://parity-{uuid.uuid4().hex[:8]}"
    res = P.run_cell(entry, backend, root, SINGLE_ASYNC if entry in ASYNC_ENTRIES else SINGLE)
    check_cell(res, entry)


# ------------------------------------------------------------------------------ 2 gloo ranks
@pytest.mark.parametrize("entry", _entries("save", "async_thread", "async_process", "async_process_pooled",
                                           "checkpoint_id", "no_dist", "rank_local", ranks=True))
def test_ranks_local(ranks, tmp_path, entry):
    for res in ranks(2).run(P.run_cell, entry, LOCAL, str(tmp_path), _kinds(entry), timeout=600):
        check_cell(res, entry)


@pytest.mark.parametrize("entry", ["save", "async_process", "async_process_pooled"])
def test_ranks_fsspec_on_files(ranks, tmp_path, entry):
    """Our fsspec backend (and stock FsspecWriter) on local files: the process executor pickles
    an fsspec filesystem."""
    for res in ranks(2).run(P.run_cell, entry, FSSPEC_FILES, str(tmp_path), _kinds(entry), timeout=600):
        check_cell(res, entry)


def _object_backend(kind: str, server) -> dict:
    return {"name": kind, "ours": server.options(), "stock": server.fsspec_options()}


@pytest.mark.parametrize("kind", ["s3", "gcs"])
@pytest.mark.parametrize("entry", _entries("save", "async_process_pooled", "rank_local", ranks=True))
def test_ranks_object_stores(ranks, request, kind, entry):
    server = request.getfixturevalue(f"{kind}_server")
    scheme = "s3" if kind == "s3" else "gs"
    root = f"{scheme}://{server.bucket}/parity-{uuid.uuid4().hex[:10]}"
    for res in ranks(2).run(P.run_cell, entry, _object_backend(kind, server), root, _kinds(entry), timeout=600):
        check_cell(res, entry)


# ------------------------------------------------------------------ every dtype, ranged and resharded
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_every_dtype_ranged_and_resharded_local(ranks, tmp_path, verify):
    """Each DCP dtype saved whole and row-sharded, loaded column-sharded (strided ranged reads:
    the packed path without verification, block-aligned scratch with it) and row-sharded (exact
    ranged reads straight into the destination), every writer/reader pair."""
    assert ranks(2).run(P.reshard_dtypes, str(tmp_path), LOCAL, verify, timeout=600) == [{}, {}]


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_every_dtype_ranged_and_resharded_object_stores(ranks, request, kind):
    server = request.getfixturevalue(f"{kind}_server")
    root = f"{'s3' if kind == 's3' else 'gs'}://{server.bucket}/parity-{uuid.uuid4().hex[:10]}"
    assert ranks(2).run(P.reshard_dtypes, root, _object_backend(kind, server), True, timeout=600) == [{}, {}]


def test_the_dtype_list_comes_from_torch():
    """The matrix's dtypes are torch's own, so a dtype torch adds is tested (and read) at once."""
    import torch

    names = {str(d) for d in P.dcp_dtypes()}
    newest = ("float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "uint16", "uint32", "uint64", "bfloat16", "bool")
    # each of these this torch has and can copy (all in 2.13; 2.7 has no float4_e2m1fn_x2, 2.9 cannot copy it)
    present = {f"torch.{n}" for n in newest if hasattr(torch, n) and stock_loads_dtype(getattr(torch, n))}
    assert present <= names
    assert len(names) >= 21 + ("torch.float4_e2m1fn_x2" in present)


def test_dtypes_stock_refuses_are_refused_the_same_way(tmp_path):
    """Bit and sub-byte placeholder dtypes: stock's planner cannot size them (torch 2.13), for
    stock's writer and ours alike, so neither writes anything."""
    import torch
    import torch.distributed.checkpoint as dcp

    rejected = P.rejected_dtypes()
    assert torch.bits8 in rejected
    for d in rejected:
        errors = {}
        for kind in ("stock", "ours"):
            url = str(tmp_path / f"{kind}-{str(d).removeprefix('torch.')}")
            with pytest.raises(BaseException) as ei:
                dcp.save({"t": torch.zeros(4, dtype=torch.uint8).view(d)}, storage_writer=P.writer(kind, LOCAL, url))
            errors[kind] = str(ei.value).strip().splitlines()[-1]
        assert errors["stock"] == errors["ours"], (d, errors)
