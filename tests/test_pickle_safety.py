"""Pickle-free by default (issue 19, point 1): a checkpoint carrying a malicious pickle (it would
create a marker file) is refused, as a non-tensor value and inside a stock ``.metadata``, with an
error naming the key and ``allow_pickle=True``; with that option (kwargs, environment, config
file) it loads and the marker appears, only then. ``inspect``/``verify`` never run it."""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import pathlib
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import dcp_ext
from dcp_ext.errors import CorruptCheckpointError, UnsafePickleError
from dcp_ext.verify import inspect_checkpoint, verify_checkpoint
from tests.pickle_payloads import Payload
from tests.support.errors import error_text as _error

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")]

HINT = "if you trust this checkpoint, pass allow_pickle=True (or set DCP_EXT_ALLOW_PICKLE=1"


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    return tmp_path / "MARKER"


def _load_obj(url: str, **opts) -> dict:
    out = {"t": torch.zeros(3), "obj": {"evil": None}}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, **opts))
    return out


# ------------------------------------------------------------------------------ BYTE_IO values
@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_malicious_value_is_refused_and_runs_only_with_allow_pickle(tmp_path, marker, monkeypatch, writer):
    url = str(tmp_path / "ck")
    state = {"t": torch.arange(3.0), "obj": {"evil": Payload(marker)}}
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url) if writer == "ours" else FileSystemWriter(url))
    assert not marker.exists()  # saving pickles the payload, it does not run it
    msg = _error(lambda: _load_obj(url))
    assert "UnsafePickleError" in msg and f"{url}: the value of 'obj.evil' cannot be loaded without full " \
        "unpickling (Unsupported global: GLOBAL tests.pickle_payloads.make_marker" in msg, msg
    assert "refusing to unpickle it (unpickling an untrusted checkpoint can run code); " + HINT in msg
    assert not marker.exists()

    out = _load_obj(url, allow_pickle=True)
    assert marker.exists() and out["obj"]["evil"] == "payload ran" and torch.equal(out["t"], torch.arange(3.0))

    marker.unlink()
    monkeypatch.setenv("DCP_EXT_ALLOW_PICKLE", "1")
    assert _load_obj(url)["obj"]["evil"] == "payload ran" and marker.exists()

    marker.unlink()
    monkeypatch.delenv("DCP_EXT_ALLOW_PICKLE")
    cfg = tmp_path / "trusted.toml"
    cfg.write_text("allow_pickle = true\n")
    assert _load_obj(url, config=str(cfg))["obj"]["evil"] == "payload ran" and marker.exists()


def test_allow_pickle_is_a_config_key():
    assert dcp_ext.Config().allow_pickle is False
    assert dcp_ext.load_config(environ={"DCP_EXT_ALLOW_PICKLE": "yes"}).allow_pickle is True
    assert dcp_ext.load_config({"allow_pickle": True}, environ={}).allow_pickle is True
    with pytest.raises(dcp_ext.ConfigError, match="allow_pickle: expected true/false, got 'sure'"):
        dcp_ext.load_config(allow_pickle="sure", environ={})


def _trainer_values() -> dict:
    return {"when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            "delta": datetime.timedelta(hours=2), "day": datetime.date(2026, 5, 6), "path": pathlib.PurePosixPath("/r/x"),
            # dicts are flattened by DCP: OrderedDict and Counter travel inside an object
            "args": argparse.Namespace(lr=0.1, layers=[1, 2], od=collections.OrderedDict(a=1),
                                       ctr=collections.Counter("aab")), "arr": np.arange(5, dtype=np.int32),
            "np_scalar": np.float64(2.5), "np_rng": np.random.RandomState(3).get_state(),
            "py_rng": random.Random(4).getstate(),
            "frozen": frozenset({1, 2}), "a_set": {3, 4}, "sl": slice(1, 9, 2), "rg": range(2, 7),
            "bio": io.BytesIO(b"raw file"),
            "cplx": 1 - 2j, "dev": torch.device("cpu"), "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
            "raw": b"\x00\x01", "barr": bytearray(b"ba"), "none": None}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, tuple) and any(isinstance(x, np.ndarray) for x in a):
        return type(a) is type(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return isinstance(b, list) and all(torch.equal(x, y) for x, y in zip(a, b))
    if isinstance(a, io.BytesIO):
        return isinstance(b, io.BytesIO) and a.getvalue() == b.getvalue()
    return type(a) is type(b) and a == b


def test_allowlisted_trainer_values_load_by_default(tmp_path):
    vals = _trainer_values()
    url = str(tmp_path / "ck")
    dcp.save({"extra": vals}, storage_writer=dcp_ext.storage_writer(url))
    out = {"extra": {k: None for k in vals}}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url))
    assert [k for k in vals if not _same(vals[k], out["extra"][k])] == []
    stock = {"extra": {k: None for k in vals}}  # what stock gives, for comparison
    dcp.load(stock, storage_reader=FileSystemReader(url))
    assert [k for k in vals if not _same(stock["extra"][k], out["extra"][k])] == []


@pytest.mark.parametrize("value,name", [(collections.defaultdict(list, a=[1]), "collections.defaultdict"),
                                        (collections.deque([1]), "collections.deque"),
                                        (print, "GLOBAL print")])
def test_values_outside_the_allowlist_need_allow_pickle(tmp_path, value, name):
    url = str(tmp_path / "ck")
    value = argparse.Namespace(x=value)  # one value (DCP would flatten a bare defaultdict, a dict)
    dcp.save({"v": value}, storage_writer=dcp_ext.storage_writer(url))
    msg = _error(lambda: dcp.load({"v": None}, storage_reader=dcp_ext.storage_reader(url)))
    assert "the value of 'v' cannot be loaded without full unpickling" in msg and HINT in msg, msg
    assert f"Unsupported global: {name if name.startswith('GLOBAL') else 'GLOBAL ' + name}" in msg, msg
    out = {"v": None}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, allow_pickle=True))
    assert out["v"] == value


# ------------------------------------------------------------------------------ stock .metadata
def _stock_with_metadata(tmp_path, payload) -> str:
    url = str(tmp_path / "stock")
    dcp.save({"t": torch.arange(3.0)}, storage_writer=FileSystemWriter(url))
    return url


def _poison_planner_data(url: str, marker) -> None:
    path = pathlib.Path(url) / ".metadata"
    md = pickle.loads(path.read_bytes())  # our own test file: trusted
    md.planner_data = {"t": ("t",), "x": Payload(marker)}
    path.write_bytes(pickle.dumps(md))


def test_malicious_stock_metadata_is_refused(tmp_path, marker):
    url = _stock_with_metadata(tmp_path, marker)
    _poison_planner_data(url, marker)
    r = dcp_ext.storage_reader(url)
    with pytest.raises(UnsafePickleError) as ei:
        r.read_metadata()
    assert str(ei.value) == (
        f"{url}/.metadata names tests.pickle_payloads.make_marker, which is not part of DCP metadata: refusing to "
        f"unpickle it (unpickling an untrusted checkpoint can run code); if you trust this checkpoint, pass "
        f"allow_pickle=True (or set DCP_EXT_ALLOW_PICKLE=1, or allow_pickle = true in the config file)")
    msg = _error(lambda: dcp.load({"t": torch.zeros(3)}, storage_reader=dcp_ext.storage_reader(url)))
    assert "tests.pickle_payloads.make_marker, which is not part of DCP metadata" in msg
    assert not marker.exists()
    out = {"t": torch.zeros(3)}
    dcp.load(out, storage_reader=dcp_ext.storage_reader(url, allow_pickle=True))
    assert marker.exists() and torch.equal(out["t"], torch.arange(3.0))


def test_metadata_that_is_not_metadata(tmp_path, marker):
    url = _stock_with_metadata(tmp_path, marker)
    (pathlib.Path(url) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafePickleError, match="names tests.pickle_payloads.make_marker"):
        dcp_ext.storage_reader(url).read_metadata()
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError, match=r"/\.metadata does not hold DCP Metadata"):
        dcp_ext.storage_reader(url, allow_pickle=True).read_metadata()
    assert marker.exists()  # allowed, it ran (and the result is refused for what it is)
    (pathlib.Path(url) / ".metadata").write_bytes(b"\x80\x05garbage")
    with pytest.raises(CorruptCheckpointError, match=r"/\.metadata is unreadable"):
        dcp_ext.storage_reader(url).read_metadata()


def test_our_checkpoints_never_unpickle_their_metadata(tmp_path, marker):
    """With our manifest the pickle is not read at all: a swapped .metadata is refused by its
    checksum, even with allow_pickle."""
    url = str(tmp_path / "ck")
    dcp.save({"t": torch.arange(3.0)}, storage_writer=dcp_ext.storage_writer(url))
    (pathlib.Path(url) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for opts in ({}, {"allow_pickle": True}):
        with pytest.raises(CorruptCheckpointError, match="does not match .dcp_ext.json"):
            dcp_ext.storage_reader(url, **opts).read_metadata()
    assert not marker.exists()


def test_stock_metadata_of_every_kind_passes_the_restricted_unpickler(tmp_path):
    """What stock writers put in .metadata (Path checkpoint ids, layouts, memory formats, every
    dtype, bytes entries, planner data) loads without allow_pickle."""
    from tests import parity_rank_fns as P

    url = str(tmp_path / "stock")
    state = {**P.make_state(("dtypes", "scalars", "views", "nested", "objects"), 2),
             "cl": torch.zeros(1, 2, 3, 4).to(memory_format=torch.channels_last)}
    dcp.save(state, storage_writer=FileSystemWriter(url))
    ours = dcp_ext.storage_reader(url).read_metadata()
    stock = FileSystemReader(url).read_metadata()
    assert ours.state_dict_metadata == stock.state_dict_metadata and ours.planner_data == stock.planner_data
    assert ours.storage_meta.checkpoint_id == stock.storage_meta.checkpoint_id  # a pathlib.Path


# --------------------------------------------------------------------------- inspect and verify
def test_inspect_and_verify_never_run_a_pickle(tmp_path, marker, monkeypatch):
    url = _stock_with_metadata(tmp_path, marker)
    _poison_planner_data(url, marker)
    monkeypatch.setenv("DCP_EXT_ALLOW_PICKLE", "1")  # ignored by inspect/verify
    with pytest.raises(UnsafePickleError):
        inspect_checkpoint(url, allow_pickle=True)
    rep = verify_checkpoint(url, allow_pickle=True)
    assert rep.errors == [f"{url} has no .dcp_ext.json: it was not written by dcp-ext, nothing to verify"]
    r = subprocess.run([sys.executable, "-m", "dcp_ext.cli", "inspect", url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "not part of DCP metadata" in r.stderr, (r.stdout, r.stderr)
    assert not marker.exists()


def test_tensorstore_backend_is_pickle_free_too(tmp_path, marker):
    """The TensorStore (zarr3) reader checks non-tensor values the same way."""
    pytest.importorskip("tensorstore")
    url = str(tmp_path / "ts")
    dcp.save({"t": torch.arange(3.0), "obj": {"evil": Payload(marker)}},
             storage_writer=dcp_ext.storage_writer(url, backend="tensorstore"))
    msg = _error(lambda: _load_obj(url, backend="tensorstore"))
    assert "the value of 'obj.evil' cannot be loaded without full unpickling (Unsupported global: GLOBAL " \
        "tests.pickle_payloads.make_marker" in msg and HINT in msg, msg
    assert not marker.exists()
    assert _load_obj(url, backend="tensorstore", allow_pickle=True)["obj"]["evil"] == "payload ran"
    assert marker.exists()
